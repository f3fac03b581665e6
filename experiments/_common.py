"""Shared plumbing of the experiment scripts: data, split and config files in the work directory."""

from __future__ import annotations

import json
import logging
import os
import sys

import ml_collections

from salun_jax.data import load_dataset
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


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_data(config: ml_collections.ConfigDict):
    try:
        return load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                            cache_dir=config.get("cache_dir") or None)
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


def write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
