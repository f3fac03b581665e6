"""Every orbax call lives here: save a train state each epoch, restore the newest good one.

Each saved step gets a `checksums.json` of its files' SHA-256, verified before a restore: orbax
restores overwritten bytes silently. A step that fails to verify or to restore is moved aside to
`<directory>.corrupt/` (kept for inspection, out of the manager's way) and the previous one is
tried, so a rerun never trips over a bad step again.

With several processes (`jax.distributed`) every process calls `save` and `restore_latest`
(orbax coordinates the write); the checksums and moving a bad step aside are process 0's, the
others wait for it. The checkpoint directory must be on a filesystem all processes share.

Restoring always goes against `jax.eval_shape` of a template state: without an abstract target,
orbax turns NamedTuple optimizer states into lists (seen with orbax-checkpoint 0.12.8).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings

import jax
import orbax.checkpoint as ocp

from salun_jax.types import PyTree

_logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"


def _sync(name: str) -> None:
    """Waits for every process to reach this point (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class CorruptCheckpointError(ValueError):
    """A checkpoint's files do not match the checksums written when it was saved."""


def _file_digests(step_dir: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if relative.startswith(CHECKSUMS):
                continue
            with open(path, "rb") as f:
                digests[relative] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` keyed by epoch, with a JSON metadata item."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def _step_dir(self, epoch: int) -> str:
        return os.path.join(self.directory, str(epoch))

    def save(self, epoch: int, state: PyTree, meta: dict | None = None) -> None:
        """Writes `state` (and JSON-able `meta`) as checkpoint `epoch`, synchronously, then its
        checksums (a step without them is one a kill interrupted: it is not trusted)."""
        state = jax.device_get(state)
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            step_dir = self._step_dir(epoch)
            digests = _file_digests(step_dir)
            tmp = os.path.join(step_dir, f"{CHECKSUMS}.tmp")
            with open(tmp, "w") as f:
                json.dump(digests, f, sort_keys=True)
            os.replace(tmp, os.path.join(step_dir, CHECKSUMS))
        _sync(f"salun_jax checksums {self.directory} {epoch}")

    def all_epochs(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def verify(self, epoch: int) -> None:
        """Raises CorruptCheckpointError unless the step's files match its checksums."""
        step_dir = self._step_dir(epoch)
        path = os.path.join(step_dir, CHECKSUMS)
        if not os.path.exists(path):
            raise CorruptCheckpointError(f"{step_dir} has no {CHECKSUMS} (an interrupted save)")
        with open(path) as f:
            expected = json.load(f)
        actual = _file_digests(step_dir)
        bad = sorted(
            name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name)
        )
        if bad:
            raise CorruptCheckpointError(f"{step_dir}: {bad[0]} does not match its checksum")

    def _move_aside(self, epoch: int) -> str:
        target_dir = f"{self.directory}.corrupt"
        target = os.path.join(target_dir, f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}")
        _sync(f"salun_jax verified {self.directory} {epoch}")  # all have read it before it moves
        if jax.process_index() == 0:
            os.makedirs(target_dir, exist_ok=True)
            shutil.move(self._step_dir(epoch), target)
        _sync(f"salun_jax moved {self.directory} {epoch}")
        self._manager.reload()
        return target

    def newest_meta(self) -> dict | None:
        """The metadata of the newest checkpoint whose files verify (None if there is none),
        read without its state: to check what made a run before restoring it."""
        for epoch in reversed(self.all_epochs()):
            try:
                self.verify(epoch)
                restored = self._manager.restore(
                    epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            except Exception:  # noqa: BLE001 - unreadable: restore_latest moves it aside
                continue
            return dict(restored.meta or {})
        return None

    def restore_latest(
        self, template: PyTree, move_aside: bool = True
    ) -> tuple[PyTree, dict, int] | None:
        """Restores the newest checkpoint that verifies and reads back; a bad one is moved aside
        (with a warning naming where) and the previous one is tried.

        Args:
          template: a state with the right structure (values unused; only its shapes/dtypes).
          move_aside: False for a reader that does not own the directory (e.g. an evaluation
            loading someone's classifier with a template that may be wrong): a checkpoint that
            fails is left in place and the failure raised.

        Returns:
          (state, meta, epoch), or None if there is no readable checkpoint; the state's arrays
          on this process's first device.

        Raises:
          ValueError: with move_aside=False, the newest checkpoint fails (one line, naming it).
        """
        abstract = jax.eval_shape(lambda: template)
        for epoch in reversed(self.all_epochs()):
            try:
                self.verify(epoch)
                restored = self._manager.restore(
                    epoch,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as error:  # noqa: BLE001 - any read failure means "try the previous"
                if not move_aside:
                    raise ValueError(
                        f"checkpoint {epoch} in {self.directory} could not be restored "
                        f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
                    ) from error
                target = self._move_aside(epoch)
                message = (
                    f"checkpoint {epoch} in {self.directory} could not be restored "
                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved to "
                    f"{target}; falling back to the previous one"
                )
                warnings.warn(message, stacklevel=2)
                _logger.warning(message)
                continue
            # Placed as a run's own output is (`loop.unreplicate`: committed to this process's
            # first device), not as the numpy arrays orbax gives: jitted code fed a restored
            # state then reuses what a trained one compiled.
            state = jax.device_put(restored.state, jax.local_devices()[0])
            return state, dict(restored.meta or {}), epoch
        return None

    def close(self) -> None:
        self._manager.close()


def save_model(directory: str, variables: PyTree, meta: dict) -> None:
    """Saves a final model (its `{"params", "batch_stats"}`, no optimizer state) and JSON-able
    `meta` (what made it) in `directory`, checksummed like every checkpoint."""
    checkpointer = Checkpointer(directory, max_to_keep=1)
    try:
        checkpointer.save(0, variables, meta)
    finally:
        checkpointer.close()


def load_model(directory: str, template: PyTree) -> tuple[PyTree, dict]:
    """The variables and meta saved by `save_model`, read against `template` (the same
    structure, e.g. the model's init variables); nothing is moved aside.

    Raises:
      FileNotFoundError: no saved model in `directory`.
      ValueError: it does not fit `template` (one line, naming it).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no saved model in {directory}")
    checkpointer = Checkpointer(directory, max_to_keep=1)
    try:
        restored = checkpointer.restore_latest(template, move_aside=False)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no saved model in {directory}")
    variables, meta, _ = restored
    return variables, meta
