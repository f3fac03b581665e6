"""Scalars for TensorBoard: event files written with tensorboardX's protobuf messages and event
file writer (protobuf and numpy; no TensorFlow), read back with plain Python.

`salun_jax.loop.run` writes one run per work directory, under `<workdir>/tensorboard/`, so
`tensorboard --logdir <pipeline workdir>` lists every run of a pipeline (original models,
Retrain, ...) by its path. The step of every scalar is the epoch (1, 2, ...). metrics.jsonl stays
the machine-readable log; these files are for looking at.

A population's records hold a list per metric, one value per member: each member gets its own
tag, `<metric>/member_<i>` (the members usually differ in a setting, e.g. the learning rate, so a
mean would hide what a population is for).

    writer = open_writer(logdir)  # None if tensorboardX is missing (a warning says so)
    try:
        write_scalars(writer, epoch, {"loss": 0.4, "accuracy": 0.9})
    finally:
        close(writer)
"""

from __future__ import annotations

import glob
import logging
import numbers
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

EVENT_FILES = "events.out.tfevents.*"  # the names TensorBoard looks for


class Writer:
    """Appends events to one new event file in a directory, synchronously (no writer thread:
    a failed write, e.g. a full disk, raises here, in the caller)."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        # events.out.tfevents.<time>.<host>, with the file_version event TensorBoard expects
        self._events = EventsWriter(os.path.join(logdir, "events"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event at `step` holding every scalar of `values` ({tag: value})."""
        summary = self._summary(
            value=[self._summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]
        )
        self._events.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def open_writer(logdir: str, *, fresh: bool = False) -> Writer | None:
    """A writer of a new event file in `logdir` (made if missing), or None if tensorboardX is
    not installed (nothing is written then; a warning says so).

    Args:
      logdir: the run's directory; TensorBoard names the run by its path.
      fresh: first delete the event files already in `logdir` (a resumed run writes its whole
        history again, so each step is there once: see `salun_jax.loop.run`).
    """
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        _logger.warning("tensorboardX is not installed: no TensorBoard files in %s", logdir)
        return None
    os.makedirs(logdir, exist_ok=True)
    if fresh:
        for path in glob.glob(os.path.join(logdir, EVENT_FILES)):
            os.remove(path)
    return Writer(logdir)


def _numbers(value) -> list[float] | float | None:
    """A float, a list of floats (a population's members), or None for what is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list | tuple | np.ndarray):
        values = np.asarray(value)
        if values.ndim == 1 and values.size and np.issubdtype(values.dtype, np.number):
            return [float(v) for v in values]
    return None


def write_scalars(writer: Writer | None, step: int, scalars: Mapping[str, Any]) -> None:
    """Adds `scalars` at `step`: a number as tag `name`, a list of numbers (a population) as
    `name/member_<i>`; other values (strings, booleans, nested) are skipped. No-op for a None
    writer."""
    if writer is None:
        return
    values = {}
    for name, value in scalars.items():
        value = _numbers(value)
        if isinstance(value, float):
            values[name] = value
        elif value is not None:
            values.update({f"{name}/member_{i}": v for i, v in enumerate(value)})
    if values:
        writer.scalars(step, values)


def flush(writer: Writer | None) -> None:
    """Writes what is buffered to disk (no-op for None)."""
    if writer is not None:
        writer.flush()


def close(writer: Writer | None) -> None:
    """Flushes and closes the writer (no-op for None)."""
    if writer is not None:
        writer.close()


def _records(path: str):
    """The payloads of a TFRecord file: each record is an 8-byte little-endian length, its
    4-byte masked CRC, the data and the data's 4-byte masked CRC (not checked here). A record
    cut short (a file still being written) ends the read."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files directly in `logdir`, in file then write
    order, without TensorFlow (the protobuf message class of tensorboardX)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, EVENT_FILES))):
        for data in _records(path):
            event = Event.FromString(data)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                    out.setdefault(value.tag, []).append((int(event.step), float(number)))
    return out
