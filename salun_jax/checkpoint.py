"""Every orbax call lives here: save a train state each epoch, restore the newest good one.

Restoring always goes against `jax.eval_shape` of a template state: without an abstract target,
orbax turns NamedTuple optimizer states into lists (environment.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` keyed by epoch, with a JSON metadata item."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def save(self, epoch: int, state: PyTree, meta: dict | None = None) -> None:
        """Writes `state` (and JSON-able `meta`) as checkpoint `epoch`, synchronously."""
        state = jax.device_get(state)
        self._manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})), force=True)
        self._manager.wait_until_finished()

    def all_epochs(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def restore_latest(self, template: PyTree) -> tuple[PyTree, dict, int] | None:
        """Restores the newest checkpoint that reads back; falls back to older ones with a warning.

        Args:
          template: a state with the right structure (values unused; only its shapes/dtypes).

        Returns:
          (state, meta, epoch), or None if there is no readable checkpoint.
        """
        abstract = jax.eval_shape(lambda: template)
        for epoch in reversed(self.all_epochs()):
            try:
                restored = self._manager.restore(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 - any read failure means "try the previous"
                message = (f"checkpoint {epoch} in {self.directory} could not be restored "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                           "falling back to the previous one")
                warnings.warn(message, stacklevel=2)
                logging.warning(message)
                continue
            return restored.state, dict(restored.meta or {}), epoch
        return None

    def close(self) -> None:
        self._manager.close()
