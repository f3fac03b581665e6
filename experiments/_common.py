"""Shared plumbing of the experiment scripts: data, split and config files in the work directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys

import ml_collections

from salun_jax.data import load_dataset, subset_per_class
from salun_jax.data.splits import Split, load_split, make_split, save_split
from salun_jax.train import TrainConfig


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """orbax logs every save at INFO through absl; keep its warnings, drop the chatter."""
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


logging.getLogger("absl").addFilter(_quiet_orbax)


def fail(message: str) -> None:
    """Exits with one clear error line (no traceback) for errors a user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def write_config(workdir: str, config: ml_collections.ConfigDict,
                 fixed_keys: tuple[str, ...] = ("dataset", "train_per_class", "test_per_class",
                                                "split", "train")) -> None:
    """Writes config.json; refuses a work directory made with a different data/split/training
    config (its checkpoints would silently be reused)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in fixed_keys if old.get(k) != new.get(k)]
        if changed:
            fail(f"{workdir} was made with a different {', '.join(changed)} config; use a new "
                 "--workdir (or restore the old settings) so its checkpoints are not reused")
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def config_hash(*parts) -> str:
    """A short hash of JSON-able parts (e.g. a method's config), to tell stale results apart."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p
                       for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_data(config: ml_collections.ConfigDict):
    try:
        dataset = load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                               cache_dir=config.get("cache_dir") or None)
        return subset_per_class(dataset, config.get("train_per_class", 0),
                                config.get("test_per_class", 0))
    except (ValueError, FileNotFoundError, OSError) as error:
        fail(str(error).splitlines()[0])


def get_split(workdir: str, dataset, split_config: ml_collections.ConfigDict) -> Split:
    """Loads `workdir/split.npz` (checked against the data set) or makes and saves one."""
    path = os.path.join(workdir, "split.npz")
    if os.path.exists(path):
        try:
            split = load_split(path, dataset.train_labels, dataset.test_labels)
        except ValueError as error:
            fail(str(error))
        logging.info("using the saved split %s (hash %s)", path, split.hash)
        return split
    kwargs = split_config.to_dict()
    try:
        split = make_split(dataset.train_labels, dataset.test_labels, dataset=dataset.name,
                           **kwargs)
    except (ValueError, TypeError) as error:
        fail(f"bad split config: {error}")
    os.makedirs(workdir, exist_ok=True)
    save_split(path, split)
    return split


def train_config(config: ml_collections.ConfigDict) -> TrainConfig:
    values = config.to_dict()
    values["milestones"] = tuple(values.get("milestones", ()))
    try:
        return TrainConfig(**values)
    except TypeError as error:
        fail(f"bad train config: {error}")


def run(main, config_flag) -> None:
    """`absl.app.run(main)`, but a bad flag or config override (unknown key, missing config file)
    ends with one clear error line instead of a traceback."""
    from absl import app, flags

    for i, arg in enumerate(sys.argv):  # config_flags prints a traceback for a missing file
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            sys.argv[i + 1] if arg == "--config" and i + 1 < len(sys.argv) else None)
        if path is not None and not os.path.exists(path.split(":", 1)[0]):
            fail(f"no config file {path}")
    try:
        remaining = flags.FLAGS(sys.argv)
        config_flag.value  # noqa: B018 - config_flags reports a bad config file only when read
    except Exception as error:  # noqa: BLE001 - anything raised while parsing flags is user input
        text = " ".join(line.strip(" '\"\\") for line in str(error).replace("\\n", "\n")
                        .splitlines() if line.strip())
        fail(f"bad command line: {text}")
    app.run(main, flags_parser=lambda argv: remaining)  # parsed once (overrides define flags)
