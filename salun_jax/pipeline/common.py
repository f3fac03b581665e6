"""What the pipelines share: user errors, config.json, config hashes, data, splits, results.

In a multi-process run (`jax.distributed`) every process runs the whole pipeline (the training
loops need all of them) but only process 0 writes files: the writers here do nothing elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os

import ml_collections

from salun_jax import report
from salun_jax.data import load_dataset, subset_per_class
from salun_jax.data.splits import Split, load_split, make_split, save_split
from salun_jax.models import create_model
from salun_jax.step import canonical_module

_logger = logging.getLogger(__name__)


class UserError(Exception):
    """An error the user can fix (a bad setting, a missing file); the command line prints its
    message as one line instead of a traceback."""


def check_config(
    workdir: str, config: ml_collections.ConfigDict, fixed_keys: tuple[str, ...]
) -> None:
    """Refuses a work directory whose config.json has other `fixed_keys` (its checkpoints would
    silently be reused)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(
            f"{path} is unreadable ({error}); delete it (the run's other files are "
            "checked on their own) or use a new --workdir"
        ) from error
    changed = [k for k in fixed_keys if old.get(k) != new.get(k)]
    if changed:
        raise UserError(
            f"{workdir} was made with a different {', '.join(changed)} config; use a "
            "new --workdir (or restore the old settings) so its checkpoints are not "
            "reused"
        )


def is_primary() -> bool:
    """True on process 0, the one that writes results, masks and logs (the only process
    without `jax.distributed`)."""
    import jax

    return jax.process_index() == 0


def write_results(path: str, results: dict) -> None:
    """`report.write_results` on process 0; nothing on the others."""
    if is_primary():
        report.write_results(path, results)


def write_text(path: str, text: str) -> None:
    """Writes a text file (e.g. results.md) on process 0; nothing on the others."""
    if is_primary():
        with open(path, "w") as f:
            f.write(text)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if not is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    # Atomically: a kill mid-write must not leave an empty config.json that blocks the resume.
    path = os.path.join(workdir, "config.json")
    with open(f"{path}.tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(f"{path}.tmp", path)


def config_hash(*parts) -> str:
    """A short hash of JSON-able parts (e.g. a method's config), to tell stale results apart."""
    text = json.dumps(
        [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sibling_config(config_file: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `name` beside `config_file` (a config built on
    another: the class-wise twin of a random-forgetting config, a shortened recipe)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def unset_like(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config section with the keys and types of `section`, every value unset (None) but
    overridable from the command line: e.g. Retrain's changes to the train recipe."""
    return ml_collections.ConfigDict(
        {key: ml_collections.config_dict.placeholder(type(value)) for key, value in section.items()}
    )


def overrides(section: ml_collections.ConfigDict) -> dict:
    """The keys of a config section that are set (not None), e.g. Retrain's changes to the
    train recipe."""
    return {key: value for key, value in section.to_dict().items() if value is not None}


def make_dataclass(cls, values: dict, what: str):
    """`cls(**values)` with tuples for lists; a bad key or value is a UserError naming `what`."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"bad {what} config: {error}") from error


def load_data(config: ml_collections.ConfigDict):
    """The config's data set, cut to `train_per_class` / `test_per_class` images per class."""
    try:
        dataset = load_dataset(
            config.dataset,
            data_dir=config.get("data_dir") or None,
            cache_dir=config.get("cache_dir") or None,
        )
        return subset_per_class(
            dataset, config.get("train_per_class", 0), config.get("test_per_class", 0)
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        raise UserError(str(error).splitlines()[0]) from error


def build_split(dataset, split_config: dict) -> Split:
    """The split a config asks for (in memory; `save_split_once` writes it)."""
    try:
        return make_split(
            dataset.train_labels, dataset.test_labels, dataset=dataset.name, **split_config
        )
    except (ValueError, TypeError) as error:
        raise UserError(f"bad split config: {error}") from error


def save_split_once(directory: str, dataset, split: Split) -> Split:
    """Writes `directory/split.npz`, or checks that the one there is this split.

    Raises:
      UserError: the file is unreadable, belongs to another data set, or holds another split.
    """
    path = os.path.join(directory, "split.npz")
    if not os.path.exists(path):
        if is_primary():
            os.makedirs(directory, exist_ok=True)
            save_split(path, split)
        return split
    try:
        stored = load_split(path, dataset.train_labels, dataset.test_labels)
    except ValueError as error:
        raise UserError(str(error)) from error
    if stored.hash != split.hash:
        raise UserError(
            f"{path} holds split {stored.hash}, not the {split.hash} this config "
            "makes (edited, or made by other code); use a new --workdir"
        )
    _logger.info("using the saved split %s (hash %s)", path, split.hash)
    return stored


def load_results(path: str, empty: dict) -> dict:
    """results.json, or `empty` when there is none.

    A damaged file (not JSON, truncated, not an object, or a key of `empty` holding another type
    than in `empty`, e.g. `{"runs": "x"}`) is moved aside to `<path>.damaged-<time>` (kept, not
    overwritten by this run's results), with a warning naming both; the run starts a new one.
    An OS error reading it (no permission, a directory) is raised: the command line names it.
    """
    import time  # noqa: PLC0415 - local: the rest of this module is not this function's

    if not os.path.exists(path):
        return empty
    try:
        loaded = report.read_results(path)
    except FileNotFoundError:  # moved aside meanwhile by process 0 of a multi-process run
        return empty
    except ValueError as error:  # JSON errors and bad UTF-8 both are ValueErrors
        problem = f"unreadable ({str(error).splitlines()[0]})"
    else:
        if not isinstance(loaded, dict):
            problem = f"a JSON {type(loaded).__name__}, not an object"
        else:
            wrong = [
                f"{key!r} is a {type(loaded[key]).__name__}, not a {type(value).__name__}"
                for key, value in empty.items()
                if key in loaded and not isinstance(loaded[key], type(value))
            ]
            if not wrong:
                return {**empty, **loaded}
            problem = "damaged: " + "; ".join(wrong)
    if not is_primary():  # process 0 moves it; the others start new results as it does
        return empty
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = f"{path}.damaged-{stamp}", 1
    while os.path.exists(aside):
        aside, n = f"{path}.damaged-{stamp}-{n}", n + 1
    os.replace(path, aside)
    _logger.warning(
        "results file %s is %s; moved it to %s and starting new results", path, problem, aside
    )
    return empty


def build_model(dataset, train_config):
    """The train config's model for `dataset`, one module object per equal model
    (`step.canonical_module`: runs of a process share compiled programs); a bad model setting
    is a `UserError`."""
    try:
        model = create_model(
            train_config.model, dataset.num_classes, dataset.mean, dataset.std, train_config.width
        )
    except ValueError as error:
        raise UserError(f"bad train config: {error}") from error
    return canonical_module(model)
