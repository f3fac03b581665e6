"""The ONE training loop: device replication, compile timing, the NaN policy, progress bars,
`metrics.jsonl`, checkpoints and resume. Training, Retrain and every unlearning method run here.

The loop pmaps a step from `salun_jax.step.make_step` over all local devices (one CPU is the same
code with one device). Data arrays are copied to every device once; each step gathers its batch
by index on the device, so an epoch never ships images from the host and syncs only at its end.

Several processes (`jax.distributed`, see `salun_jax.pipeline.cli`) run the same loop: the
epoch's index batches are built for the GLOBAL device count and are the same on every process
(they derive from (seed, epoch)); each process feeds its local devices its own rows of them, and
the step's collectives span all processes. Checkpoints are saved by all processes together
(orbax coordinates them); metrics.jsonl, TensorBoard files, logs and progress bars come from
process 0 only.

Logs go through the `salun_jax.loop` logger: one line per epoch (`epoch_line`), at INFO when
`LOG_EVERY_SECONDS` passed since the run's previous INFO line (and then for its last epoch too),
else at DEBUG, so fast runs do not flood the log (absl: `--verbosity=1` shows every epoch,
`--verbosity=-1` warnings only). Progress bars follow `set_progress`: by default only when stderr
is a terminal.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from salun_jax import metric_writer
from salun_jax.provenance import code_version
from salun_jax.step import AXIS, TrainState
from salun_jax.types import BatchesFn, PyTree

_logger = logging.getLogger(__name__)

_BAR_LAG = 2  # steps in flight while a progress bar is shown

PROGRESS_MODES = ("auto", "on", "off")
_progress_mode = "auto"

# An epoch's line is logged at INFO when this many seconds passed since the run's start or its
# previous INFO line (and the last epoch too, once a line was); the others at DEBUG.
LOG_EVERY_SECONDS = 30.0


def set_progress(mode: str) -> None:
    """Where runs asked for progress bars (`run(progress=True)`) show them: "auto" (the
    default) only when stderr is a terminal (a redirected log gets none), "on" always, "off"
    never. The experiment scripts' `--progress` flag sets it."""
    global _progress_mode
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    _progress_mode = mode


def _show_progress(progress: bool) -> bool:
    if not progress or not is_primary() or _progress_mode == "off":
        return False
    if _progress_mode == "on":
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class TrainingDivergedError(RuntimeError):
    """The loss, the gradients, the weights or the BatchNorm statistics became NaN or infinite."""


class RunOutput(NamedTuple):
    """The final (unreplicated) state, one record per epoch, seconds of compilation and of the
    run proper (all epochs, across resumes), and the code version(s) that made it."""

    state: TrainState
    history: list[dict]
    compile_seconds: float
    run_seconds: float
    code: str = ""


def replicate(tree: PyTree) -> PyTree:
    """Copies every leaf to all local devices, stacked on a leading device axis (for pmap)."""
    # Via host copies: leaves that share a buffer (e.g. `extra` = params) must not alias, since
    # the pmapped step donates the state. The axis name matches pmap outputs' sharding, so the
    # second step does not retrace.
    return flax.jax_utils.replicate(jax.device_get(tree), axis_name=AXIS)


def unreplicate(tree: PyTree) -> PyTree:
    """Device 0's copy, placed plainly on that device (no pmap mesh in its type, so jitted code
    fed it, fresh arrays or a restored checkpoint does not retrace)."""
    # Through the host: a slice of a pmap output keeps the `batch` mesh in its type
    # (jax 0.10), and so would a device-to-device copy.
    device = jax.local_devices()[0]
    return jax.device_put(jax.device_get(jax.tree.map(lambda x: x[0], tree)), device)


def is_primary() -> bool:
    """True on the process that writes logs, results and metrics (process 0; the only one
    without `jax.distributed`)."""
    return jax.process_index() == 0


def local_rows(tree: PyTree) -> PyTree:
    """This process's rows of global index batches [S, D_global, ...] -> [S, D_local, ...]:
    rows `process_index * local_count` onwards (a no-op with one process).

    Raises:
      ValueError: the batches were not built for `jax.device_count()` devices.
    """
    num_global, num_local = jax.device_count(), jax.local_device_count()
    first = jax.process_index() * num_local

    def rows(x):
        if x.shape[1] != num_global:
            raise ValueError(
                f"batches have {x.shape[1]} device rows; build them for jax.device_count() = "
                f"{num_global} (all processes' devices), not the local count"
            )
        return x[:, first : first + num_local]

    return jax.tree.map(rows, tree)


def _gather(data: dict, indices, weights) -> dict:
    streams = indices if isinstance(indices, dict) else {"": indices}
    batch = {
        f"{stream}_{name}" if stream else name: values[index]
        for stream, index in streams.items()
        for name, values in data.items()
    }
    batch["weight"] = weights
    return batch


@functools.cache
def parallel_step(step: Callable) -> Callable:
    """pmaps a step built with `axis_name=AXIS`: (replicated state, replicated data, indices,
    weights, rng) -> (state, metrics), gathering each device's batch from its copy of the data."""
    return jax.pmap(
        lambda state, data, indices, weights, rng: step(
            state, _gather(data, indices, weights), rng
        ),
        axis_name=AXIS,
        in_axes=(0, 0, 0, 0, None),
        donate_argnums=(0,),
    )


# Compiled pmapped steps of this process: (step, the arguments' tree structure, avals and
# shardings) -> executable. A run whose step and argument types match an earlier one's (another
# seed, method or learning rate: values live in the state) reuses its executable: no tracing,
# no compilation, 0 s of compile time. The least recently used are dropped past
# _MAX_EXECUTABLES (a long process, e.g. a test session, builds many distinct steps).
_EXECUTABLES: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_MAX_EXECUTABLES = 64


def _signature(tree: PyTree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


def compiled_step(step: Callable, *args) -> tuple[Callable, float]:
    """The executable of `parallel_step(step)` for arguments like `args`, compiled ahead of time
    on the first call with such arguments and reused after; returns it and the seconds spent
    compiling now (0 on reuse)."""
    key = (step, _signature(args))
    compiled = _EXECUTABLES.get(key)
    if compiled is not None:
        _EXECUTABLES.move_to_end(key)
        return compiled, 0.0
    start = time.perf_counter()
    compiled = parallel_step(step).lower(*args).compile()
    _EXECUTABLES[key] = compiled
    while len(_EXECUTABLES) > _MAX_EXECUTABLES:
        _EXECUTABLES.popitem(last=False)
    return compiled, time.perf_counter() - start


@jax.pmap
def _all_finite(params: PyTree, batch_stats: PyTree) -> jax.Array:
    # Takes the trees, not the state: the state's type holds its optimizer, which differs
    # between runs and would make every run compile this anew.
    leaves = jax.tree.leaves((params, batch_stats))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _reduce(step_metrics: list[dict]) -> dict:
    """Example-weighted epoch means of the steps' (psum-ed) metrics; `finite` is False if any
    step's loss or gradient norm was not finite. A population's metrics ([N] per step) give a
    list per metric, one value per member; `num_examples` counts one member's examples."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *step_metrics))
    stacked = {name: np.asarray(values)[:, 0] for name, values in stacked.items()}  # device 0
    counts = stacked.pop("num_examples")  # [S] or [S, N]
    total = np.maximum(np.sum(counts, axis=0), 1.0)
    out = {name: np.sum(values * counts, axis=0) / total for name, values in stacked.items()}
    out = {name: value.tolist() if np.ndim(value) else float(value) for name, value in out.items()}
    out["num_examples"] = float(np.sum(counts.reshape(counts.shape[0], -1)[:, 0]))
    out["finite"] = bool(
        np.all(np.isfinite(stacked["loss"])) and np.all(np.isfinite(stacked["grad_norm"]))
    )
    return out


def _is_injected(node) -> bool:
    return hasattr(node, "hyperparams") and hasattr(node, "count")


def _plain_float(x) -> float:
    """A float32 value as it is written (0.05, not 0.05000000074505806)."""
    return float(str(x)) if isinstance(x, np.float32) else float(x)


def _learning_rate(opt_state_r: PyTree) -> float | list[float] | None:
    """The learning rate of the last update made with a replicated (device axis first) optimizer
    state, read from the state of an `optax.inject_hyperparams` optimizer: `optim.multistep_sgd`
    keeps its base rate, milestones and scales there, and the schedule is applied here at the
    update count as the optimizer applies it; any other injected `learning_rate` already is the
    current value. A population's state gives a list, one rate per member. None if the
    optimizer keeps no learning rate in its state (e.g. a plain float in `optim.make_adam`)."""
    for node in jax.tree.leaves(opt_state_r, is_leaf=_is_injected):
        if not _is_injected(node) or "learning_rate" not in node.hyperparams:
            continue
        names = [n for n in ("learning_rate", "boundaries", "scales") if n in node.hyperparams]
        # Device 0's copy of a few scalars (per member): no other leaf leaves the device.
        values = {
            n: np.asarray(v)[0]
            for n, v in jax.device_get({n: node.hyperparams[n] for n in names}).items()
        }
        rate = values["learning_rate"]
        if "boundaries" in values and "scales" in values:
            # As optim._multistep_sgd_factory: the rate times every scale whose boundary the
            # count of the last update (the state's count - 1) reached.
            count = np.asarray(jax.device_get(node.count))[0]
            passed = values["boundaries"] <= (count - 1)[..., None]
            scales = np.where(passed, values["scales"].astype(rate.dtype), rate.dtype.type(1))
            for i in range(scales.shape[-1]):  # in order, rounding as the optimizer does
                rate = rate * scales[..., i]
        return [_plain_float(x) for x in rate] if np.ndim(rate) else _plain_float(rate[()])
    return None


_LINE_SKIPS = ("phase", "epoch", "num_examples", "seconds", "images_per_s")


def _short(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        return str(value)
    if isinstance(value, list):  # a population: the members' mean
        finite = [v for v in value if isinstance(v, int | float) and np.isfinite(v)]
        return f"{np.mean(finite):.4g}" if finite else "nan"
    return f"{value:.4g}"


def epoch_line(record: dict, num_epochs: int) -> str:
    """The epoch's one log line, e.g. `original s1 epoch 3/20: loss 0.412, accuracy 0.892,
    grad_norm 1.14, learning_rate 0.05, val_accuracy 88.65; 0.41 s`; a population's lists
    show their mean over the (finite) members."""
    names = sorted((n for n in record if n not in _LINE_SKIPS), key=lambda n: n != "loss")
    values = ", ".join(f"{name} {_short(record[name])}" for name in names)
    members = next((len(v) for v in record.values() if isinstance(v, list)), 0)
    mean = f" (means of {members} members)" if members else ""
    return (
        f"{record.get('phase', '')} epoch {record['epoch']}/{num_epochs}: {values}{mean}; "
        f"{record.get('seconds', 0.0):.2f} s"
    )


def epoch_scalars(record: dict) -> dict:
    """The record's TensorBoard scalars: its numbers (lists: one per member), `seconds` as
    `epoch_seconds`; not the epoch (the step) nor the example count."""
    skips = ("epoch", "num_examples")
    out = {("epoch_seconds" if k == "seconds" else k): v for k, v in record.items()}
    return {k: v for k, v in out.items() if k not in skips}


def epoch_key(key: jax.Array, epoch: int) -> jax.Array:
    """The epoch's key, `fold_in(key, epoch)`; member by member for a population's [N] keys."""
    if jnp.ndim(key) == 0:
        return jax.random.fold_in(key, epoch)
    return jax.vmap(lambda k: jax.random.fold_in(k, epoch))(key)


class StaleRunError(ValueError):
    """A work directory holds checkpoints of a run made by other settings, data or code."""


def _check_fingerprint(checkpointer, workdir: str, fingerprint: dict, desc: str) -> None:
    stored = checkpointer.newest_meta()
    if stored is None:
        return
    made_by = stored.get("fingerprint") or {}
    differ = sorted(
        k for k in set(fingerprint) | set(made_by) if fingerprint.get(k) != made_by.get(k)
    )
    if differ:
        checkpointer.close()
        raise StaleRunError(
            f"{desc}: {workdir} holds a run made with other {', '.join(differ)}; use another "
            "work directory (or delete it to start over), so that its model is not reused"
        )


def write_log(workdir: str, history: list[dict]) -> None:
    """Writes `workdir/metrics.jsonl` anew from the checkpointed `history`, atomically (a temporary
    file renamed over it): a kill at any instant leaves the old log or the new one, never a partial
    line, and an epoch that a resume re-runs is recorded once. Process 0 only."""
    if not is_primary():
        return
    path = os.path.join(workdir, "metrics.jsonl")
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in history)
    os.replace(f"{path}.tmp", path)


@dataclasses.dataclass
class _Track:
    """What a run keeps across epochs and resumes: its history, timings, code version, the
    epochs in its newest checkpoint, and its checkpointer and TensorBoard writer."""

    state: TrainState
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    code: str = ""
    checkpointer: object = None
    writer: object = None
    saved: int = 0  # epochs in the newest checkpoint
    last_info: float = 0.0  # perf_counter of the run's previous INFO line
    logged_info: bool = False

    def output(self, state: TrainState) -> RunOutput:
        return RunOutput(state, self.history, self.compile_seconds, self.run_seconds, self.code)


def _resume(state, workdir, fingerprint, desc: str, num_epochs: int) -> _Track:
    """The run's track: fresh, or restored from the newest readable checkpoint in `workdir`
    (refused with `StaleRunError` if another fingerprint made it); metrics.jsonl is rewritten
    from the restored history."""
    track = _Track(state, code=code_version())
    if workdir is None:
        return track
    from salun_jax.checkpoint import Checkpointer

    os.makedirs(workdir, exist_ok=True)
    track.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    if fingerprint is not None:
        _check_fingerprint(track.checkpointer, workdir, fingerprint, desc)
    restored = track.checkpointer.restore_latest(state)
    if restored is None:
        return track
    track.state, meta, last_epoch = restored
    track.start_epoch, track.history = last_epoch + 1, list(meta.get("history", []))
    track.compile_seconds = float(meta.get("compile_seconds", 0.0))
    track.run_seconds = float(meta.get("run_seconds", 0.0))
    made_by = meta.get("code", "unknown (an older salun_jax)")
    if made_by != track.code and track.start_epoch < num_epochs:
        _logger.warning(
            "%s: resuming a run made by code %s with code %s", desc, made_by, track.code
        )
        made_by = f"{made_by} then {track.code}"
    track.code = made_by
    # The log is the checkpoint's history: epochs a kill lost from it come back, and epochs
    # after the restored checkpoint (a corrupt-checkpoint fallback) leave it.
    write_log(workdir, track.history)
    if is_primary():
        level = logging.INFO if track.start_epoch < num_epochs else logging.DEBUG
        _logger.log(level, "%s: resuming after epoch %d in %s", desc, track.start_epoch, workdir)
    return track


def _run_steps(compiled, state_r, data_r, batches, bar_desc: str | None):
    """One epoch's steps over `batches` (indices, weights, keys); a progress bar of finished
    steps named `bar_desc` (None: no bar). Returns the state and the steps' (device) metrics."""
    indices, weights, keys = batches
    num_steps = weights.shape[0]
    bar = None
    if bar_desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc=bar_desc, leave=False, mininterval=2.0)
    step_metrics = []
    for s in range(num_steps):
        batch_indices = jax.tree.map(lambda x, s=s: x[s], indices)
        state_r, metrics = compiled(state_r, data_r, batch_indices, weights[s], keys)
        step_metrics.append(metrics)
        if bar is not None and s >= _BAR_LAG:
            # The bar counts finished steps, not dispatched ones: wait for the step _BAR_LAG
            # back (the device keeps that many queued, so it never idles).
            jax.block_until_ready(step_metrics[s - _BAR_LAG]["loss"])
            bar.update(1)
    if bar is not None:
        jax.block_until_ready(step_metrics[-1]["loss"])
        bar.update(num_steps - bar.n)
        bar.close()
    return state_r, step_metrics


def _nonfinite(track: _Track, nonfinite: str, desc: str, epoch: int, workdir) -> None:
    """A non-finite epoch: warned about ("warn") or `TrainingDivergedError` ("raise")."""
    if nonfinite == "warn":
        _logger.warning("%s: non-finite values in epoch %d; going on", desc, epoch + 1)
        return
    kept = (
        f"the last good checkpoint (epoch {track.saved}) is kept in {workdir}"
        if track.checkpointer is not None and track.saved
        else "nothing was saved"
    )
    raise TrainingDivergedError(
        f"{desc}: non-finite loss, gradients or weights in epoch {epoch + 1}; "
        f"stopped ({kept}). Lower the learning rate or check the data."
    )


def _report(track: _Track, record: dict, num_epochs: int) -> None:
    """The epoch's log line (INFO at most every `LOG_EVERY_SECONDS`, and then for the last
    epoch too) and its TensorBoard scalars. Process 0 only."""
    if not is_primary():
        return
    now = time.perf_counter()
    info = now - track.last_info >= LOG_EVERY_SECONDS or (
        track.logged_info and record["epoch"] == num_epochs
    )
    if info:
        track.last_info, track.logged_info = now, True
    _logger.log(logging.INFO if info else logging.DEBUG, "%s", epoch_line(record, num_epochs))
    metric_writer.write_scalars(track.writer, record["epoch"], epoch_scalars(record))


def _open_tensorboard(track: _Track, workdir) -> None:
    """The run's TensorBoard writer (process 0, with a `workdir`). Like metrics.jsonl, the event
    files hold the checkpoint's history: a resume writes it anew (each epoch once, none that a
    kill lost), then the epochs it runs."""
    if workdir is None or not is_primary():
        return
    track.writer = metric_writer.open_writer(os.path.join(workdir, "tensorboard"), fresh=True)
    for record in track.history:
        metric_writer.write_scalars(track.writer, record["epoch"], epoch_scalars(record))


def _executable(track: _Track, step, state_r, data_r, indices, weights, keys) -> Callable:
    """The epoch loop's step: compiled ahead of time (its seconds go to the track), or, with
    several processes, the pmapped step itself: a multi-process pmap lowers for the global
    device count and its AOT executable then rejects the local arrays, so it compiles on the
    first call (its seconds count in the first epoch's run time)."""
    if jax.process_count() > 1:
        return parallel_step(step)
    first = jax.tree.map(lambda x: x[0], indices)
    compiled, seconds = compiled_step(step, state_r, data_r, first, weights[0], keys)
    track.compile_seconds += seconds
    return compiled


def _epoch_record(track: _Track, step_metrics, state_r, start: float, desc: str, epoch: int):
    """The epoch's record from its steps' metrics (the one host sync of the epoch), with the
    optimizer's learning rate and "finite" (loss, gradient norm, weights and BatchNorm
    statistics all finite); its seconds go to the track."""
    metrics = _reduce(step_metrics)
    rate = _learning_rate(state_r.opt_state)
    if rate is not None:
        metrics["learning_rate"] = rate
    metrics["finite"] = metrics["finite"] and bool(
        _all_finite(state_r.params, state_r.batch_stats)[0]
    )
    seconds = time.perf_counter() - start
    track.run_seconds += seconds
    record = {"phase": desc, "epoch": epoch + 1, "seconds": seconds}
    return {**record, "images_per_s": metrics["num_examples"] / seconds, **metrics}


def _save(track: _Track, epoch: int, state_r, fingerprint, workdir: str) -> None:
    """A checkpoint after `epoch` (its history, timings, code and fingerprint), then
    metrics.jsonl rewritten from that history."""
    metric_writer.flush(track.writer)  # TensorBoard shows the epochs as they are saved
    meta = {
        "history": track.history,
        "compile_seconds": track.compile_seconds,
        "run_seconds": track.run_seconds,
        "code": track.code,
        "fingerprint": fingerprint,
    }
    track.checkpointer.save(epoch, unreplicate(state_r), meta)
    write_log(workdir, track.history)
    track.saved = epoch + 1


def run(
    state: TrainState,
    step: Callable,
    data: dict[str, np.ndarray],
    batches_fn: BatchesFn,
    *,
    num_epochs: int,
    key: jax.Array,
    seed: int,
    workdir: str | None = None,
    checkpoint_every: int = 1,
    eval_fn: Callable[[TrainState], dict] | None = None,
    epoch_start_fn: Callable[[TrainState, int], TrainState] | None = None,
    progress: bool = True,
    desc: str = "train",
    nonfinite: str = "raise",
    fingerprint: dict[str, str] | None = None,
) -> RunOutput:
    """Runs `num_epochs` epochs of `step`, data-parallel over all devices of all processes.

    Epoch e draws its batches as `batches_fn(e, np.random.default_rng([seed, e]))` and its key as
    `fold_in(key, e)`, so a resumed run ends with the same parameters as an uninterrupted one.
    The step is compiled ahead of time once per process per step and argument types
    (`compiled_step`); its seconds are reported apart (0 when an executable is reused).
    With a `workdir`: a checkpoint every `checkpoint_every` epochs and after the last, then
    metrics.jsonl rewritten from its history (`write_log`), TensorBoard scalars per epoch in
    `workdir/tensorboard/`, and a rerun resumes from the newest readable checkpoint. A
    population (`salun_jax.population`: a member axis on the state, [N] keys) runs here too;
    its records hold a list per metric, one value per member.

    Args:
      state: the initial (unreplicated) state.
      step: from `make_step(..., axis_name=AXIS)`.
      data: per-example arrays indexed by the batches; copied to every device once.
      batches_fn: (epoch, numpy generator) -> (indices, weights), see `types.EpochBatches`,
        built for `jax.device_count()` devices; every process must get the same batches.
      num_epochs, key, seed: as above.
      workdir, checkpoint_every: checkpoints, metrics.jsonl, TensorBoard (None: nothing written).
      eval_fn: state -> dict of extra metrics for the epoch's record.
      epoch_start_fn: (replicated state, epoch) -> state, before the epoch's first step.
      progress: a progress bar per epoch, where `set_progress` lets them show.
      desc: the run's name in records, bars and errors (e.g. the method).
      nonfinite: "raise" (`TrainingDivergedError`) or "warn" (log it and go on: a population
        whose grid puts some members past their stable learning rate keeps the others).
      fingerprint: {part: fingerprint} of what makes this run (`provenance.fingerprint`), saved
        with every checkpoint: a `workdir` made by anything else is refused, never resumed.

    Returns:
      A `RunOutput`.

    Raises:
      TrainingDivergedError: a non-finite loss, gradient norm, weight or BatchNorm statistic at
        the end of an epoch, naming `desc` and the epoch; the last good checkpoint is kept.
      ValueError: `checkpoint_every` < 1.
      StaleRunError: `workdir` holds a run with another `fingerprint`.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 epoch, got {checkpoint_every}")
    if nonfinite not in ("raise", "warn"):
        raise ValueError(f"nonfinite must be 'raise' or 'warn', got {nonfinite!r}")
    track = _resume(state, workdir, fingerprint, desc, num_epochs)
    track.saved = track.start_epoch
    try:
        if track.start_epoch >= num_epochs:
            return track.output(track.state)
        _open_tensorboard(track, workdir)
        track.last_info = time.perf_counter()
        state_r = replicate(track.state)
        data_r = replicate({name: np.asarray(values) for name, values in data.items()})
        compiled = None
        for epoch in range(track.start_epoch, num_epochs):
            indices, weights = local_rows(batches_fn(epoch, np.random.default_rng([seed, epoch])))
            keys = epoch_key(key, epoch)
            if compiled is None:
                compiled = _executable(track, step, state_r, data_r, indices, weights, keys)
            start = time.perf_counter()
            if epoch_start_fn is not None:
                state_r = epoch_start_fn(state_r, epoch)
            bar = f"{desc} {epoch + 1}/{num_epochs}" if _show_progress(progress) else None
            batches = (indices, weights, keys)
            state_r, step_metrics = _run_steps(compiled, state_r, data_r, batches, bar)
            record = _epoch_record(track, step_metrics, state_r, start, desc, epoch)
            if not record.pop("finite"):
                _nonfinite(track, nonfinite, desc, epoch, workdir)
            if eval_fn is not None:
                record.update(eval_fn(unreplicate(state_r)))
            track.history.append(record)
            _report(track, record, num_epochs)
            last = epoch + 1 == num_epochs
            if track.checkpointer is not None and ((epoch + 1) % checkpoint_every == 0 or last):
                _save(track, epoch, state_r, fingerprint, workdir)
        return track.output(unreplicate(state_r))
    finally:
        metric_writer.close(track.writer)
        if track.checkpointer is not None:
            track.checkpointer.close()
