"""TensorBoard event files from the training loop, read back without TensorFlow, and the logs a
person reads: one line per epoch (INFO only for slow runs), no progress bars in a redirected log,
`--verbosity` and `--progress`."""

import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from salun_jax import loop, metric_writer, optim
from salun_jax.data.batches import index_batches
from salun_jax.losses import classification_loss
from salun_jax.models import create_model
from salun_jax.step import create_train_state, make_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALARS = {"loss", "grad_norm", "accuracy", "learning_rate", "epoch_seconds", "val_accuracy"}


def _events(logdir):
    """The Event messages of every event file in `logdir`, from the TFRecord framing: 8-byte
    length, its 4-byte masked CRC32C, the data, the data's masked CRC32C (both checked)."""
    names = sorted(n for n in os.listdir(logdir) if n.startswith("events.out.tfevents."))
    assert names, os.listdir(logdir)
    events = []
    for name in names:
        with open(os.path.join(logdir, name), "rb") as f:
            blob = f.read()
        at = 0
        while at < len(blob):
            header = blob[at : at + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
            assert header_crc == masked_crc32c(header)
            data = blob[at + 12 : at + 12 + length]
            (data_crc,) = struct.unpack("<I", blob[at + 12 + length : at + 16 + length])
            assert data_crc == masked_crc32c(data)
            events.append(Event.FromString(data))
            at += 16 + length
    return events


def _scalars(workdir):
    """{tag: [(step, value), ...]} of the run's event files."""
    out = {}
    for event in _events(os.path.join(workdir, "tensorboard")):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _fit(state, data, workdir=None, epochs=2, **kwargs):
    """As tests/test_loop.py: digits in batches of 100 (15 steps an epoch)."""
    out = loop.run(
        state,
        make_step(classification_loss(crop_padding=1, flip=False)),
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


def _multistep_state(digits, milestones):
    """A small CNN with `optim.multistep_sgd` (its learning rate is a value of the state)."""
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    tx = optim.multistep_sgd(0.1, milestones, 0.1, steps_per_epoch=15)
    state = create_train_state(model, jax.random.key(0), digits.image_shape, tx)
    data = {"image": digits.train_images, "label": digits.train_labels}
    return state, data


def _assert_scalars_match(scalars, history):
    epochs = [r["epoch"] for r in history]
    assert SCALARS <= set(scalars), sorted(scalars)
    for tag in SCALARS:
        key = "seconds" if tag == "epoch_seconds" else tag
        assert [step for step, _ in scalars[tag]] == epochs, (tag, scalars[tag])  # each once
        np.testing.assert_allclose(
            [value for _, value in scalars[tag]],
            [r[key] for r in history],
            rtol=1e-6,
            err_msg=tag,
        )


def test_each_epoch_writes_its_scalars(digits, tmp_path):
    state, data = _multistep_state(digits, milestones=(1,))
    calls = []

    def eval_fn(s):
        calls.append(int(s.step))
        return {"val_accuracy": 50.0 + len(calls)}

    _, history = _fit(state, data, str(tmp_path), epochs=2, eval_fn=eval_fn)
    # The learning rate of each epoch: 0.1, then 0.01 after the milestone at epoch 1.
    assert [r["learning_rate"] for r in history] == pytest.approx([0.1, 0.01], rel=1e-6)
    scalars = _scalars(tmp_path)
    _assert_scalars_match(scalars, history)
    assert [v for _, v in scalars["val_accuracy"]] == [51.0, 52.0]
    assert metric_writer.read_scalars(str(tmp_path / "tensorboard")) == scalars
    assert len(history) == len((tmp_path / "metrics.jsonl").read_text().splitlines())


def test_a_resumed_run_holds_each_epoch_once(digits, tmp_path):
    """Killed in epoch 4 with a checkpoint every 2 epochs: epoch 3 had reached the event file,
    not the checkpoint. The resumed run's files hold epochs 1-4, each once, equal to its
    history."""
    state, data = _multistep_state(digits, milestones=(2,))

    def crash_in_epoch_four(s):
        if int(s.step) > 3 * 15:
            raise KeyboardInterrupt
        return {"val_accuracy": 1.0}

    with pytest.raises(KeyboardInterrupt):
        _fit(state, data, str(tmp_path), epochs=4, checkpoint_every=2, eval_fn=crash_in_epoch_four)
    killed = _scalars(tmp_path)
    assert [step for step, _ in killed["loss"]] == [1, 2, 3]  # flushed and closed on the way out
    _, history = _fit(
        state,
        data,
        str(tmp_path),
        epochs=4,
        checkpoint_every=2,
        eval_fn=lambda s: {"val_accuracy": 1.0},
    )
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    _assert_scalars_match(_scalars(tmp_path), history)
    assert [r["learning_rate"] for r in history] == pytest.approx([0.1, 0.1, 0.01, 0.01], rel=1e-6)


def test_population_lists_write_one_tag_per_member(tmp_path):
    writer = metric_writer.open_writer(str(tmp_path))
    try:
        metric_writer.write_scalars(
            writer, 1, {"loss": [0.5, 0.25], "phase": "RL", "finite": True, "lr": 0.1}
        )
    finally:
        metric_writer.close(writer)
    metric_writer.write_scalars(None, 1, {"loss": 1.0})  # no writer: nothing, no error
    assert metric_writer.read_scalars(str(tmp_path)) == {
        "loss/member_0": [(1, 0.5)],
        "loss/member_1": [(1, 0.25)],
        "lr": [(1, pytest.approx(0.1))],
    }
    line = loop.epoch_line({"phase": "RL", "epoch": 2, "seconds": 0.5, "loss": [0.5, 0.25]}, 3)
    assert line == "RL epoch 2/3: loss 0.375 (means of 2 members); 0.50 s"


def test_epoch_lines_are_info_only_for_slow_runs(digits, caplog, monkeypatch):
    state, data = _multistep_state(digits, milestones=())
    caplog.set_level("DEBUG", logger="salun_jax.loop")
    _fit(state, data, epochs=2)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "salun_jax.loop"]
    assert [level for level, _ in lines] == ["DEBUG", "DEBUG"]  # a fast run: DEBUG only
    assert re.fullmatch(r"train epoch 1/2: loss [\d.]+, .*; [\d.]+ s", lines[0][1]), lines
    caplog.clear()
    monkeypatch.setattr(loop, "LOG_EVERY_SECONDS", 0.0)  # every epoch is "slow"
    _fit(state, data, epochs=2)
    levels = [r.levelname for r in caplog.records if r.name == "salun_jax.loop"]
    assert levels == ["INFO", "INFO"]


def _train(workdir, *flags):
    """experiments/train.py on digits for 2 epochs, stdout and stderr into one pipe (compiled
    at level 1, conftest: full-width digits epochs run long enough for it to pay)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "experiments", "train.py"),
            f"--config={os.path.join(REPO, 'experiments', 'configs', 'digits.py')}",
            "--config.train.epochs=2",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # piped: not a terminal
        text=True,
    )


def test_a_redirected_log_is_short_and_verbosity_minus_one_quiets_it(tmp_path):
    plain = _train(tmp_path).communicate(timeout=300)[0]
    lines = [line for line in re.split(r"[\r\n]", plain) if line.strip()]
    assert not [line for line in lines if "it/s" in line or "%|" in line], lines  # no bars
    assert len(lines) <= 6, lines
    assert (tmp_path / "tensorboard").is_dir()
    # Again (it resumes, nothing to train, its results logged again), warnings only.
    quiet = _train(tmp_path, "--verbosity=-1").communicate(timeout=300)[0]
    assert "test accuracy" in quiet  # the script's printed result, not a log line
    assert not [line for line in quiet.splitlines() if re.match(r"I\d{4} ", line)], quiet


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_progress_bars_show_on_a_terminal_or_as_asked(digits, capsys, monkeypatch, mode):
    state, data = _multistep_state(digits, milestones=())
    monkeypatch.setattr(loop, "_progress_mode", loop._progress_mode)  # restored afterwards
    loop.set_progress(mode)
    loop.run(
        state,
        make_step(classification_loss(crop_padding=1, flip=False)),
        data,
        index_batches(np.arange(len(data["label"])), 100),
        num_epochs=1,
        key=jax.random.key(3),
        seed=3,
        progress=True,
    )
    bars = "it/s" in capsys.readouterr().err  # pytest's stderr is no terminal
    assert bars == (mode == "on")
    with pytest.raises(ValueError, match="progress must be one of"):
        loop.set_progress("sometimes")
