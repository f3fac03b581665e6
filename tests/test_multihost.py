"""`loop.run` across 2 processes (jax.distributed, gloo on CPU) matches one process."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from salun_jax import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_COMMON = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from salun_jax import loop, optim
    from salun_jax.losses import classification_loss
    from salun_jax.step import TrainState, make_step
    from salun_jax.data.batches import index_batches

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, batch_mask=None):
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    def fit(workdir=None):
        model = MLP()
        params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optim.make_sgd(0.1))
        rng = np.random.default_rng(0)
        data = {"image": rng.integers(0, 256, (60, 8, 8, 1)).astype(np.uint8),
                "label": rng.integers(0, 10, 60).astype(np.int32)}
        # 60 examples in batches of 16: the last batch is padded (weights 0) on one process.
        return loop.run(
            state, make_step(classification_loss(crop_padding=0, flip=False)), data,
            index_batches(np.arange(60), 16), num_epochs=2, key=jax.random.key(1), seed=3,
            workdir=workdir, progress=False)
""")

_WORKER = (
    textwrap.dedent("""
    import sys
    import jax
    from salun_jax.pipeline.cli import initialize_distributed
    port, process_id, workdir, out = sys.argv[1:]
    initialize_distributed(f"127.0.0.1:{port}", 2, int(process_id))
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 2, 1)
""")
    + _COMMON
    + textwrap.dedent("""
    output = fit(workdir)
    flat = {"/".join(str(k) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(output.state.params)}
    np.savez(out, loss=output.history[-1]["loss"], **flat)
    jax.distributed.shutdown()
    print("PROCESS_OK", process_id)
""")
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, attempt):
    """Runs both processes; returns their (returncode, stdout, stderr), or None on a hang."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    port, workdir = _free_port(), tmp_path / f"run{attempt}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(port), str(i), workdir, tmp_path / f"p{i}.npz"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        return None, workdir
    finally:
        for proc in procs:  # only the processes this test started
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results, workdir


def test_two_processes_match_one_process(tmp_path):
    """Collectives on these 2-core machines can hang: a timeout and one retry, as in
    `test_loop.test_two_devices_match_one_device`."""
    for attempt in range(2):
        results, workdir = _launch(tmp_path, attempt)
        hung = results is None or any(
            rc != 0 and "Termination timeout" in err for rc, _, err in results
        )
        if hung and attempt == 0:
            continue
        if results is None:
            pytest.fail("2-process loop.run hung twice (collective deadlock)")
        for rc, out, err in results:
            assert rc == 0, err[-3000:]
            assert "PROCESS_OK" in out
        break
    namespace = {}
    exec(_COMMON, namespace)  # noqa: S102 - the same model, data and loop in this process
    single = namespace["fit"]()
    flat = {
        "/".join(str(k) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(single.state.params)
    }
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as saved:
            multi = {name: saved[name] for name in flat}
            np.testing.assert_allclose(saved["loss"], single.history[-1]["loss"], rtol=1e-5)
        chex.assert_trees_all_close(multi, flat, atol=1e-5, rtol=1e-5)
    # One metrics.jsonl line per epoch (process 0 only) and checkpoints both processes saved.
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1"]


def test_local_rows_rejects_batches_for_the_local_count():
    indices = np.zeros((3, jax.device_count(), 4), np.int32)
    np.testing.assert_array_equal(loop.local_rows(indices), indices)
    with pytest.raises(ValueError, match="device_count"):
        loop.local_rows(np.zeros((3, jax.device_count() + 1, 4), np.int32))
