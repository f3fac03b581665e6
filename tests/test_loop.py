import json
import os
import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax import loop, optim
from salun_jax.checkpoint import Checkpointer
from salun_jax.data.batches import epoch_batches, index_batches
from salun_jax.evaluation.classification import make_predict_fn, model_accuracy
from salun_jax.loop import TrainingDivergedError
from salun_jax.losses import classification_loss, softmax_cross_entropy
from salun_jax.models import create_model
from salun_jax.step import create_train_state, make_step

# Whole digits epochs, resumed and repeated: level 1 pays (conftest; this module 32.1 s -> 22.4 s).
pytestmark = pytest.mark.xla_optimized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(digits, lr=0.1):
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    state = create_train_state(model, jax.random.key(0), digits.image_shape, optim.make_sgd(lr))
    data = {"image": digits.train_images, "label": digits.train_labels}
    return model, state, data


def _step(**kwargs):
    return make_step(classification_loss(crop_padding=1, flip=False), **kwargs)


def _fit(state, data, workdir=None, epochs=2, step=None, **kwargs):
    out = loop.run(
        state,
        step or _step(),
        data,
        index_batches(np.arange(len(data["label"])), 100),
        num_epochs=epochs,
        key=jax.random.key(3),
        seed=3,
        workdir=workdir,
        progress=False,
        **kwargs,
    )
    return out.state, out.history


def test_epoch_batches_cover_everything_once():
    indices = np.arange(10, 33)
    batch_indices, weights = epoch_batches(indices, 8, np.random.default_rng(0), num_devices=2)
    chex.assert_shape(batch_indices, (3, 2, 4))
    valid = batch_indices[weights > 0]
    np.testing.assert_array_equal(np.sort(valid), indices)  # each index once with weight 1
    assert weights.sum() == 23
    with pytest.raises(ValueError, match="not divisible"):
        epoch_batches(indices, 9, None, num_devices=2)


def test_small_model_learns_digits_without_retracing(digits):
    model, state, data = _setup(digits)
    step = chex.assert_max_traces(_step(), n=1)
    state, history = _fit(state, data, epochs=8, step=step)
    assert history[-1]["loss"] < history[0]["loss"]
    acc = model_accuracy(
        make_predict_fn(model.apply), state.variables, digits.test_images, digits.test_labels
    )
    assert acc > 70.0, acc  # chance is 10%
    assert int(state.step) == 8 * 15  # 1437 examples / 100 -> 15 steps (last one padded)


def test_resume_equals_uninterrupted(digits, tmp_path):
    _, state, data = _setup(digits)
    straight, _ = _fit(state, data, str(tmp_path / "a"), epochs=3)

    def crash_in_epoch_two(s):
        if int(s.step) > 20:
            raise KeyboardInterrupt  # an interruption after epoch 1 was saved
        return {}

    with pytest.raises(KeyboardInterrupt):
        _fit(state, data, str(tmp_path / "b"), epochs=3, eval_fn=crash_in_epoch_two)
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).all_epochs() == [0]
    resumed, history = _fit(state, data, str(tmp_path / "b"), epochs=3)
    chex.assert_trees_all_equal(straight.params, resumed.params)
    chex.assert_trees_all_equal(straight.batch_stats, resumed.batch_stats)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_checkpoint_every_n_epochs_resumes_from_the_last_saved(digits, tmp_path):
    _, state, data = _setup(digits)
    straight, _ = _fit(state, data, epochs=3)
    steps_per_epoch = 15

    def crash_in_epoch_four(s):  # epochs 1-3 done; only epoch 2 (index 1) was saved
        if int(s.step) > 3 * steps_per_epoch:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _fit(state, data, str(tmp_path), epochs=5, checkpoint_every=2, eval_fn=crash_in_epoch_four)
    assert Checkpointer(str(tmp_path / "checkpoints")).all_epochs() == [1]
    metrics = tmp_path / "metrics.jsonl"
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2]
    resumed, history = _fit(state, data, str(tmp_path), epochs=3, checkpoint_every=2)
    chex.assert_trees_all_equal(straight.params, resumed.params)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert Checkpointer(str(tmp_path / "checkpoints")).all_epochs() == [1, 2]  # the last, too
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        _fit(state, data, str(tmp_path), checkpoint_every=0)


def test_corrupt_latest_checkpoint_falls_back(digits, tmp_path):
    _, state, data = _setup(digits)
    _fit(state, data, str(tmp_path), epochs=2)
    checkpoints = tmp_path / "checkpoints"
    latest = checkpoints / "1"
    for root, _, files in os.walk(latest / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.warns(UserWarning, match="checkpoint 1 .* could not be restored.*moved to"):
        restored = Checkpointer(str(checkpoints)).restore_latest(state)
    assert restored is not None and restored[2] == 0
    assert not latest.exists()  # moved aside (kept for inspection), out of the manager's way
    (moved,) = (tmp_path / "checkpoints.corrupt").iterdir()
    assert moved.name.startswith("1-")
    # Training on continues in the same directory: saving epoch 1 again works.
    _fit(state, data, str(tmp_path), epochs=2)
    assert Checkpointer(str(checkpoints)).all_epochs() == [0, 1]


def _log_epochs(workdir):
    return [
        json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("damage", ["lost_line", "partial_line", "corrupt_checkpoint"])
def test_metrics_log_holds_each_checkpointed_epoch_once(digits, tmp_path, damage):
    """A kill between a checkpoint and the log write (its line lost), a kill during the write (a
    partial line), and a corrupt-checkpoint fallback (epochs re-run): the resumed log holds every
    epoch exactly once, each line whole."""
    _, state, data = _setup(digits)
    _fit(state, data, str(tmp_path), epochs=2)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    if damage == "lost_line":
        log.write_text(lines[0] + "\n")
    elif damage == "partial_line":
        log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    else:
        for path in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the corrupt checkpoint's warning
        _fit(state, data, str(tmp_path), epochs=3)
    assert _log_epochs(tmp_path) == [1, 2, 3]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits, tmp_path):
    _, state, data = _setup(digits)
    _fit(state, data, str(tmp_path), epochs=1)
    nan_step = make_step(
        classification_loss(
            example_loss_fn=lambda logits, labels: softmax_cross_entropy(logits, labels) * jnp.nan
        )
    )
    with pytest.raises(TrainingDivergedError, match="non-finite .* in epoch 2.*epoch 1"):
        _fit(state, data, str(tmp_path), epochs=2, step=nan_step)
    restored = Checkpointer(str(tmp_path / "checkpoints")).restore_latest(state)
    assert restored[2] == 0
    chex.assert_tree_all_finite(restored[0].params)


def test_nan_weights_with_a_finite_loss_are_caught(digits, tmp_path):
    """A step whose loss is finite but whose update leaves NaN weights (or BatchNorm statistics)
    must not be saved as the last good checkpoint."""
    _, state, data = _setup(digits)
    _fit(state, data, str(tmp_path), epochs=1)
    poison = _step(
        post_update_fn=lambda s: s.replace(
            batch_stats=jax.tree.map(lambda x: x * jnp.nan, s.batch_stats)
        )
    )
    with pytest.raises(TrainingDivergedError, match="in epoch 2"):
        _fit(state, data, str(tmp_path), epochs=2, step=poison)
    restored = Checkpointer(str(tmp_path / "checkpoints")).restore_latest(state)
    assert restored[2] == 0
    chex.assert_tree_all_finite(restored[0].batch_stats)


def test_runs_that_differ_in_values_trace_and_compile_the_step_once(digits):
    # Another seed (init, batch order, keys), learning rate and schedule: the same shapes, so
    # one trace and one compile; the later runs reuse the executable and report 0 s compiling.
    # The learning rate is a value of the state and really used: 0 leaves the weights as they
    # were (momentum and weight decay only ever scale a zero step), 0.1 and 0.05 differ.
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    loss_fn = chex.assert_max_traces(classification_loss(crop_padding=0, flip=False), n=1)
    step = make_step(loss_fn)
    data = {"image": digits.train_images, "label": digits.train_labels}
    runs = {}
    for seed, lr, milestones in ((0, 0.1, (1,)), (1, 0.05, (1,)), (0, 0.05, (2,)), (0, 0.0, (1,))):
        tx = optim.multistep_sgd(lr, milestones, 0.1, steps_per_epoch=3)
        state = create_train_state(model, jax.random.key(seed), digits.image_shape, tx)
        runs[seed, lr] = (
            state.params,
            loop.run(
                state,
                step,
                data,
                index_batches(np.arange(300), 100),
                num_epochs=2,
                key=jax.random.key(seed),
                seed=seed,
                progress=False,
            ),
        )
    compile_seconds = [out.compile_seconds for _, out in runs.values()]
    assert compile_seconds[0] > 0 and compile_seconds[1:] == [0.0, 0.0, 0.0], compile_seconds
    start, frozen = runs[0, 0.0]
    chex.assert_trees_all_equal(frozen.state.params, start)
    moved_fast, moved_slow = runs[0, 0.1][1].state.params, runs[0, 0.05][1].state.params
    assert not np.allclose(jax.tree.leaves(moved_fast)[0], jax.tree.leaves(start)[0])
    assert not np.allclose(jax.tree.leaves(moved_fast)[0], jax.tree.leaves(moved_slow)[0])


def test_run_reports_compile_and_run_time_and_keeps_them_across_resume(digits, tmp_path):
    _, state, data = _setup(digits)
    first = loop.run(
        state,
        _step(),
        data,
        index_batches(np.arange(300), 100),
        num_epochs=1,
        key=jax.random.key(0),
        seed=0,
        workdir=str(tmp_path),
        progress=False,
    )
    assert first.compile_seconds > 0 and first.run_seconds > 0
    again = loop.run(
        state,
        _step(),
        data,
        index_batches(np.arange(300), 100),
        num_epochs=2,
        key=jax.random.key(0),
        seed=0,
        workdir=str(tmp_path),
        progress=False,
    )
    assert again.run_seconds > first.run_seconds  # the restored epoch's seconds are kept
    assert again.compile_seconds >= first.compile_seconds
    assert again.run_seconds == pytest.approx(sum(r["seconds"] for r in again.history))


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, chex
    from salun_jax import optim
    from salun_jax.losses import classification_loss
    from salun_jax.loop import parallel_step, replicate, unreplicate
    from salun_jax.step import TrainState, make_step
    assert jax.local_device_count() == 2, jax.devices()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, batch_mask=None):
            del batch_mask  # no BatchNorm
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optim.make_sgd(0.1))
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 256, (64, 8, 8, 1)).astype(np.uint8),
            "label": rng.integers(0, 10, 64).astype(np.int32)}
    indices = np.arange(16, dtype=np.int32)
    key = jax.random.key(1)
    loss_fn = classification_loss(crop_padding=0, flip=False)
    single = jax.jit(make_step(loss_fn, axis_name=None))
    batch = {"image": data["image"][indices], "label": data["label"][indices],
             "weight": np.ones(16, np.float32)}
    s1 = state
    for _ in range(3):
        s1, m1 = single(s1, batch, key)
    p_step = parallel_step(make_step(loss_fn))
    s2, data_r = replicate(state), replicate(data)
    for _ in range(3):
        s2, m2 = p_step(s2, data_r, indices.reshape(2, 8), np.ones((2, 8), np.float32), key)
    chex.assert_trees_all_close(s1.params, unreplicate(s2).params, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m2["loss"][0], rtol=1e-5)
    chex.assert_trees_all_equal(*[jax.tree.map(lambda x, i=i: x[i], s2.params) for i in (0, 1)])

    # A padded last batch split unevenly (device 1: 6 of 8 are padding) still gives the mean
    # over the 10 real examples, as one device does.
    weights = np.ones((2, 8), np.float32)
    weights[1, 2:] = 0.0
    real = indices.reshape(2, 8)[weights > 0]
    one, _ = single(state, {"image": data["image"][real], "label": data["label"][real],
                            "weight": np.ones(10, np.float32)}, key)
    two, m3 = p_step(replicate(state), data_r, indices.reshape(2, 8), weights, key)
    chex.assert_trees_all_close(one.params, unreplicate(two).params, atol=1e-6, rtol=1e-5)
    assert float(m3["num_examples"][0]) == 10.0
    print("TWO_DEVICES_OK")
""")


def test_two_devices_match_one_device():
    """Collectives across forced host devices can deadlock on 2-core machines:
    run in a subprocess with a timeout, retry once, and fail with a clear message on a hang."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    for attempt in range(2):
        try:
            result = subprocess.run(
                [sys.executable, "-c", _TWO_DEVICE_SCRIPT],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            if attempt == 0:
                continue
            pytest.fail("2-device pmap step hung twice (XLA:CPU all-reduce rendezvous deadlock)")
        # The XLA:CPU rendezvous deadlock ends in a fatal "Termination timeout": retry that too.
        if result.returncode != 0 and "Termination timeout" in result.stderr and attempt == 0:
            continue
        assert result.returncode == 0, result.stderr[-3000:]
        assert "TWO_DEVICES_OK" in result.stdout
        return
