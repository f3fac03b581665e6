"""The classification pipeline's fair-tuning stage (`salun_jax.tuning`): grids from the config,
one tuned run per method and seed, and the tuned table beside the default one.

Config (`config.tuning`): `enabled`, `strategy` (the population strategy) and
`grids = {method: {"learning_rates": (...), "knob_values": (...)}}` (the knob is the method's, from
`tuning.KNOBS`); every grid must have the same size.
"""

from __future__ import annotations

import ml_collections

from salun_jax import tuning
from salun_jax.pipeline.common import UserError


def tuning_grids(config: ml_collections.ConfigDict) -> dict[str, tuning.TuningGrid]:
    """The grids of the methods that run, or {} when tuning is off.

    Raises:
      UserError: an unknown method, a bad grid, or grids of different sizes.
    """
    spec = config.get("tuning")
    if not spec or not spec.get("enabled", False):
        return {}
    grids = {}
    for method in config.run_methods:  # the tables' order
        grid = spec.grids.get(method)
        if grid is None:
            continue
        try:
            grids[method] = tuning.make_grid(method, grid.learning_rates, grid.knob_values)
        except (ValueError, AttributeError) as error:
            raise UserError(f"tuning.grids.{method}: {error}") from error
    if "Retrain" not in config.run_methods:
        raise UserError("tuning selects against Retrain: add 'Retrain' to run_methods")
    unknown = sorted(set(spec.grids) - set(tuning.KNOBS))
    if unknown:
        raise UserError(f"no tuning protocol for {unknown}; tunable: {', '.join(tuning.KNOBS)}")
    if not grids:
        raise UserError(
            f"tuning is enabled but no method in run_methods has a grid; tunable: "
            f"{', '.join(tuning.KNOBS)}"
        )
    try:
        tuning.check_budget(grids)
    except ValueError as error:
        raise UserError(str(error)) from error
    return grids


def chosen_table(tuning_results: dict) -> str:
    """Markdown: per seed and method, the chosen setting and its validation Avg. Gap."""
    lines = [
        "| seed | method | learning rate | knob | value | validation gap |",
        "|---|---|---|---|---|---|",
    ]
    for seed, methods in sorted(tuning_results.items(), key=lambda kv: int(kv[0])):
        for method, entry in methods.items():
            if method == "Retrain":
                continue
            chosen, knob = entry["chosen"], entry["grid"]["knob"]
            lines.append(
                f"| {seed} | {method} | {chosen['learning_rate']:.3g} | {knob} | "
                f"{chosen[knob]:.3g} | {chosen['gap']:.2f} |"
            )
    return "\n".join(lines)
