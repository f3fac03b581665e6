"""Results on disk and for people: results JSON, a paper-style markdown table, and plots.

Run records, as written by the experiment scripts and read by `summarize`:

    {"method": "FT", "seed": 1,
     "metrics": {"UA": 0.63, "RA": 99.88, "TA": 94.06, "MIA": 2.13, "run_time_s": 142.2}}

All metrics in percent, as in the paper; `run_time_s` is the unlearning wall-clock time in seconds
(compilation excluded where the script can separate it).

References:
  SalUn (Fan et al., ICLR 2024), Table 1 (format: mean ± std (gap to Retrain), Avg. Gap, RTE);
  SalUn Table 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from salun_jax.evaluation.metrics import gaps

TABLE_KEYS = ("UA", "MIA", "RA", "TA")  # the paper's column order
RUN_TIME_KEY = "run_time_s"


# ------------------------------------------------------------------------------------------------
# Results JSON.


def _to_jsonable(obj: Any) -> Any:
    """Recursively converts numpy / JAX values, tuples, paths and dataclasses to JSON types."""
    if isinstance(obj, Mapping):
        return {_json_key(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # includes jax.Array
        return np.asarray(obj).tolist()
    raise TypeError(f"Cannot write a value of type {type(obj).__name__} to results JSON: {obj!r}")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, np.generic):
        key = key.item()
    if isinstance(key, bool | int | float) or key is None:
        return json.dumps(key)
    raise TypeError(f"Results JSON keys must be strings or numbers, got {type(key).__name__}.")


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> pathlib.Path:
    """Writes `results` as indented JSON, atomically (temporary file + `os.replace`).

    numpy / JAX scalars become Python numbers and arrays become (nested) lists; tuples become
    lists. NaN and infinities are written as `NaN` / `Infinity` (Python's json reads them back).
    Parent directories are created. A reader never sees a half-written file.

    Args:
      path: destination, e.g. `<workdir>/results.json`.
      results: a mapping with string (or numeric) keys.

    Returns:
      The path written.

    Raises:
      TypeError: for values that have no JSON form; the destination is then left untouched.
    """
    path = pathlib.Path(path)
    text = json.dumps(_to_jsonable(results), indent=2) + "\n"  # convert before touching disk
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_results(path: str | os.PathLike) -> Any:
    """Reads a file written by `write_results`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Summaries and the paper-style table.


def summarize(
    runs: Sequence[Mapping[str, Any]],
    reference_method: str | None = "Retrain",
    keys: Sequence[str] = TABLE_KEYS,
) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds per method, plus gaps to the reference method's means.

    Standard deviations are population std (`ddof=0`, numpy's default); the paper does not say
    which it used. Gaps are `|mean(method) - mean(reference)|` from unrounded means, and Avg. Gap
    is their mean over `keys`, as in the paper.

    Args:
      runs: records `{"method": str, "seed": int, "metrics": {key: float, ...}}`. Every run needs
        all `keys`; `run_time_s` is summarized when all runs of a method have it.
      reference_method: the method gaps are measured against (Retrain); `None` for no gaps.
      keys: metric keys to summarize and to average in Avg. Gap.

    Returns:
      `{method: {"n_runs", "seeds", "mean": {k: ...}, "std": {k: ...}, "gap": {k: ...} | None,
      "avg_gap": float | None}}`, methods in order of first appearance. `mean`/`std` hold `keys`
      plus `run_time_s` when present; the reference's own gaps are 0.

    Raises:
      ValueError: on an empty `runs`, malformed records, missing metric keys, a repeated
        (method, seed) pair, or a `reference_method` that has no runs.
    """
    keys = tuple(keys)
    if not runs:
        raise ValueError("runs is empty; nothing to summarize.")
    if not keys:
        raise ValueError("keys is empty.")
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    seen: set[tuple[str, Any]] = set()
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping) or "method" not in run or "metrics" not in run:
            raise ValueError(
                f"runs[{i}] must be a mapping with 'method' and 'metrics', got {run!r}."
            )
        method, metrics = run["method"], run["metrics"]
        missing = [k for k in keys if k not in metrics]
        if missing:
            raise ValueError(
                f"runs[{i}] (method {method!r}, seed {run.get('seed')!r}) lacks metric keys "
                f"{missing}."
            )
        if "seed" in run:
            if (method, run["seed"]) in seen:
                raise ValueError(f"Method {method!r} has two runs with seed {run['seed']!r}.")
            seen.add((method, run["seed"]))
        by_method.setdefault(method, []).append(metrics)

    if reference_method is not None and reference_method not in by_method:
        raise ValueError(
            f"Reference method {reference_method!r} has no runs; methods are {list(by_method)}."
        )

    seeds: dict[str, list[Any]] = {m: [] for m in by_method}
    for run in runs:
        seeds[run["method"]].append(run.get("seed"))

    summary: dict[str, dict[str, Any]] = {}
    for method, method_runs in by_method.items():
        stat_keys = keys
        if all(RUN_TIME_KEY in m for m in method_runs) and RUN_TIME_KEY not in keys:
            stat_keys = keys + (RUN_TIME_KEY,)
        values = {k: np.asarray([float(m[k]) for m in method_runs]) for k in stat_keys}
        summary[method] = {
            "n_runs": len(method_runs),
            "seeds": seeds[method],
            "mean": {k: float(np.mean(v)) for k, v in values.items()},
            "std": {k: float(np.std(v, ddof=0)) for k, v in values.items()},
            "gap": None,
            "avg_gap": None,
        }
    if reference_method is not None:
        reference_mean = summary[reference_method]["mean"]
        for entry in summary.values():
            entry["gap"] = gaps(entry["mean"], reference_mean, keys)
            entry["avg_gap"] = float(np.mean(list(entry["gap"].values())))
    return summary


def code_versions_note(runs: Sequence[Mapping[str, Any]]) -> str:
    """ "" when every run (and the model it started from) was made by one code version; else a
    line naming the versions, so a table that mixes code says so."""
    versions = set()
    for run in runs:
        versions.add(run.get("code", "unknown (older salun_jax)"))
        if run.get("model_code"):
            versions.update(str(run["model_code"]).split(" then "))
    if len(versions) <= 1:
        return ""
    return (
        f"Note: these rows come from {len(versions)} code versions "
        f"({', '.join(sorted(versions))}); rerun in a new work directory for one.\n\n"
    )


def format_number(x: float | None, precision: int = 2) -> str:
    """`x` with `precision` decimals; "n/a" for None, NaN or inf; never "-0.00"."""
    if x is None or not math.isfinite(x):
        return "n/a"
    text = f"{x:.{precision}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{precision}f}"
    return text


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of string cells, one line per row, ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(
    summary: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str] = TABLE_KEYS,
    reference_method: str | None = "Retrain",
    *,
    precision: int = 2,
    time_unit: str = "s",
) -> str:
    """A markdown table in the paper's Table 1 format.

    Cells are `mean±std (gap)` with the gap `|mean - mean(reference)|` recomputed for `keys`;
    the reference row has no brackets and an Avg. Gap of 0.00. Rows: the reference first, then
    the other methods in the summary's order. The last column is the mean of `run_time_s`
    ("n/a" when absent), in seconds or minutes.

    Example row: `| FT | 0.63±0.55 (4.61) | 2.13±0.16 (10.75) | 99.88±0.08 (0.12) |
    94.06±0.27 (0.20) | 3.92 | 142.20 |`.

    Args:
      summary: the output of `summarize`.
      keys: metric columns, in order.
      reference_method: the row to compare against; `None` drops gaps and the Avg. Gap column.
      precision: decimals in every number.
      time_unit: `"s"` or `"min"` for the RTE column.

    Returns:
      The table, one line per row, ending in a newline.

    Raises:
      ValueError: on an empty summary, a missing reference or key, or an unknown time unit.
    """
    keys = tuple(keys)
    if not summary:
        raise ValueError("summary is empty.")
    if time_unit not in ("s", "min"):
        raise ValueError(f"time_unit must be 's' or 'min', got {time_unit!r}.")
    if reference_method is not None and reference_method not in summary:
        raise ValueError(
            f"Reference method {reference_method!r} is not in the summary ({list(summary)})."
        )
    for method, entry in summary.items():
        missing = [k for k in keys if k not in entry["mean"] or k not in entry["std"]]
        if missing:
            raise ValueError(f"Summary of {method!r} lacks keys {missing}.")

    order = list(summary)
    if reference_method is not None:
        order.remove(reference_method)
        order.insert(0, reference_method)
        reference_mean = summary[reference_method]["mean"]

    header = ["Method", *keys]
    if reference_method is not None:
        header.append("Avg. Gap")
    header.append(f"RTE ({time_unit})")
    rows = []
    for method in order:
        entry = summary[method]
        mean, std = entry["mean"], entry["std"]
        cells = [str(method)]
        per_key = None
        if reference_method is not None:
            per_key = gaps(mean, reference_mean, keys)
        for k in keys:
            cell = f"{format_number(mean[k], precision)}±{format_number(std[k], precision)}"
            if per_key is not None and method != reference_method:
                cell += f" ({format_number(per_key[k], precision)})"
            cells.append(cell)
        if per_key is not None:
            cells.append(format_number(float(np.mean(list(per_key.values()))), precision))
        run_time = mean.get(RUN_TIME_KEY)
        scale = 60.0 if time_unit == "min" else 1.0
        cells.append(format_number(None if run_time is None else run_time / scale, precision))
        rows.append(cells)
    return markdown(header, rows)


# ------------------------------------------------------------------------------------------------
# Plots. matplotlib is imported lazily and drawn on an explicit Agg canvas, so no display is
# needed and pyplot's global state (and backend) is never touched.


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike) -> pathlib.Path:
    """Writes `fig` as a PNG at 120 dpi, atomically (temporary file + `os.replace`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def plot_sweep(
    fractions: Sequence[float],
    metrics_by_fraction: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """Line plot of metrics (UA/RA/TA/MIA, %) against the saliency-mask fraction; writes a PNG.

    Args:
      fractions: x values, the fraction of weights kept salient (e.g. 0.1 ... 0.9).
      metrics_by_fraction: `{name: [value per fraction]}`, each as long as `fractions`.
      path: PNG destination (parents created).
      title: optional figure title.

    Returns:
      The path written.

    Raises:
      ValueError: on empty inputs or series whose lengths differ from `fractions`.
    """
    xs = [float(f) for f in fractions]
    if not xs:
        raise ValueError("fractions is empty.")
    if not metrics_by_fraction:
        raise ValueError("metrics_by_fraction is empty.")
    bad = {k: len(v) for k, v in metrics_by_fraction.items() if len(v) != len(xs)}
    if bad:
        raise ValueError(f"Series lengths {bad} differ from len(fractions) = {len(xs)}.")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, values in metrics_by_fraction.items():
        ax.plot(xs, [float(v) for v in values], marker="o", label=name)
    ax.set_xlabel("saliency mask fraction")
    ax.set_ylabel("%")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def plot_layer_saliency(
    layer_names: Sequence[str],
    fractions: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """Horizontal bar chart of the fraction of salient weights per layer; writes a PNG.

    Args:
      layer_names: one label per layer, drawn top to bottom in the given order.
      fractions: per-layer fraction of weights in the mask, in [0, 1].
      path: PNG destination (parents created).
      title: optional figure title.

    Returns:
      The path written.

    Raises:
      ValueError: on empty inputs, mismatched lengths, or fractions outside [0, 1].
    """
    names = [str(n) for n in layer_names]
    values = [float(f) for f in fractions]
    if not names:
        raise ValueError("layer_names is empty.")
    if len(names) != len(values):
        raise ValueError(f"{len(names)} layer names but {len(values)} fractions.")
    out_of_range = [(n, v) for n, v in zip(names, values, strict=True) if not 0.0 <= v <= 1.0]
    if out_of_range:
        raise ValueError(f"Fractions must lie in [0, 1]; got {out_of_range[:5]}.")
    fig = _new_figure(7.0, max(2.0, 0.25 * len(names) + 1.0))
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, values)
    ax.set_yticks(positions, labels=names, fontsize=7)
    ax.invert_yaxis()  # first layer at the top
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("fraction of salient weights")
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def plot_epsilon_histogram(
    epsilons: Sequence[float],
    path: str | os.PathLike,
    *,
    bucket_width: float = 0.5,
    title: str | None = None,
) -> pathlib.Path:
    """Histogram of per-example epsilons (forgetting quality) in the metric's buckets; writes a PNG.

    Bars have the metric's bucket width (0.5: bucket k earns 2^-k points); infinite epsilons
    (perfectly separated examples) are drawn in one last bar labelled "inf".

    Args:
      epsilons: one epsilon per forget example (>= 0, may be inf).
      path: PNG destination (parents created).
      bucket_width: the width of the metric's buckets.
      title: optional figure title.

    Returns:
      The path written.

    Raises:
      ValueError: on empty input, NaN or negative epsilons.
    """
    values = np.asarray(epsilons, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("epsilons is empty.")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError("epsilons must be non-negative numbers (inf allowed).")
    finite = values[np.isfinite(values)]
    top = (
        bucket_width * (np.floor(finite.max() / bucket_width) + 1) if finite.size else bucket_width
    )
    edges = np.arange(0.0, top + bucket_width / 2, bucket_width)
    counts, _ = np.histogram(finite, bins=edges)
    fig = _new_figure(6.0, 3.5)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=bucket_width, align="edge", edgecolor="black")
    num_inf = int(np.sum(np.isinf(values)))
    if num_inf:
        ax.bar([edges[-1] + bucket_width], [num_inf], width=bucket_width, align="edge", color="C3")
        ax.text(edges[-1] + 1.5 * bucket_width, num_inf, "inf", ha="center", va="bottom")
    ax.set_xlabel(f"per-example epsilon (buckets of {bucket_width})")
    ax.set_ylabel("forget examples")
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


AVG_GAP_LABEL = "Avg. Gap"


def plot_gaps(
    summary: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    keys: Sequence[str] = TABLE_KEYS,
    reference_method: str = "Retrain",
) -> pathlib.Path:
    """Grouped bars of the main table: per method, |gap to the reference| of each metric and the
    Avg. Gap (percentage points); writes a PNG.

    One group per method in the summary's order, the reference itself left out (its gaps are
    0); "Original" is drawn like any method. Each bar carries its value; a NaN gap is an empty
    slot marked "n/a".

    Args:
      summary: the output of `summarize` with a reference method (gaps filled in).
      path: PNG destination (parents created), e.g. `<workdir>/plots/gaps.png`.
      title: optional figure title.
      keys: the metrics to draw, in order (those of the table).
      reference_method: the method the gaps were measured against, for the axis label and to
        leave its row out.

    Returns:
      The path written.

    Raises:
      ValueError: an empty summary, one without gaps (summarized with `reference_method=None`),
        a method lacking a key's gap, or no method but the reference.
    """
    keys = tuple(keys)
    if not summary:
        raise ValueError("summary is empty; nothing to plot.")
    no_gaps = [m for m, entry in summary.items() if entry.get("gap") is None]
    if no_gaps:
        raise ValueError(
            f"The summary has no gaps for {no_gaps}: summarize the runs with a reference "
            "method (e.g. summarize(runs, reference_method='Retrain')) to plot gaps."
        )
    methods = [m for m in summary if m != reference_method]
    if not methods:
        raise ValueError(f"The summary holds only {reference_method!r}; no gaps to plot.")
    for method in methods:
        missing = [k for k in keys if k not in summary[method]["gap"]]
        if missing:
            raise ValueError(f"The gaps of {method!r} lack keys {missing}.")
    series = {k: [float(summary[m]["gap"][k]) for m in methods] for k in keys}
    series[AVG_GAP_LABEL] = [
        float("nan") if summary[m].get("avg_gap") is None else float(summary[m]["avg_gap"])
        for m in methods
    ]

    fig = _new_figure(min(16.0, max(6.0, 0.3 * len(series) * len(methods) + 2.0)), 4.5)
    ax = fig.add_subplot()
    positions = np.arange(len(methods), dtype=np.float64)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        is_avg = name == AVG_GAP_LABEL
        bars = ax.bar(
            positions + (i - (len(series) - 1) / 2) * width,
            values,
            width,
            label=name,
            color="0.25" if is_avg else f"C{i}",
            edgecolor="black",
            linewidth=0.5,
            hatch="//" if is_avg else None,
        )
        ax.bar_label(
            bars,
            labels=[format_number(v, 1) for v in values],
            fontsize=7,
            padding=1,
            rotation=90 if len(methods) > 4 else 0,
        )
    ax.set_xticks(positions, labels=[str(m) for m in methods])
    if max(len(str(m)) for m in methods) > 8:
        for label in ax.get_xticklabels():
            label.set_rotation(20)
            label.set_horizontalalignment("right")
    top = max((v for values in series.values() for v in values if math.isfinite(v)), default=0.0)
    ax.set_ylim(0.0, 1.2 * top if top > 0 else 1.0)  # room for the value labels
    ax.set_ylabel(f"|gap to {reference_method}| (percentage points)")
    ax.set_xlabel("method (lower is closer to retraining)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="metric", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def plot_roc_curves(
    scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """ROC curves of attacks on log-log axes (the low-FPR regime of LiRA papers); writes a PNG.

    Args:
      scores: `{name: (positive scores, negative scores)}` (NaN dropped; higher = positive).
      path: PNG destination (parents created).
      title: optional figure title.

    Returns:
      The path written.
    """
    from salun_jax.evaluation.audit import attack_metrics, roc_curve

    if not scores:
        raise ValueError("scores is empty.")
    fig = _new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    floor = 1e-4
    for index, (name, (positive, negative)) in enumerate(scores.items()):
        fpr, tpr = roc_curve(positive, negative)
        auc = attack_metrics(positive, negative)["auc"]
        style = "-" if index < 10 else "--"  # matplotlib's colour cycle repeats after 10
        ax.plot(
            np.maximum(fpr, floor),
            np.maximum(tpr, floor),
            linestyle=style,
            label=f"{name} (AUC {auc:.3f})",
        )
    ax.plot([floor, 1.0], [floor, 1.0], color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def plot_relearning_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """Forget accuracy (%) against relearning steps, one panel per kind of attack data.

    Args:
      curves: `{name: {kind: [accuracy after 0, 1, ..., k steps]}}` (kinds: e.g. "retain",
        "retain+forget"), every name with the same kinds.
      path: PNG destination (parents created).
      title: optional figure title.

    Returns:
      The path written.
    """
    if not curves:
        raise ValueError("curves is empty.")
    kinds = list(next(iter(curves.values())))
    fig = _new_figure(5.0 * len(kinds), 4.0)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        for index, (name, by_kind) in enumerate(curves.items()):
            values = [float(v) for v in by_kind[kind]]
            style = "-" if index < 10 else "--"  # matplotlib's colour cycle repeats after 10
            ax.plot(range(len(values)), values, marker=".", linestyle=style, label=name)
        ax.set_xlabel(f"relearning steps ({kind})")
        ax.set_ylabel("forget accuracy %")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)
