"""Fault injection: every case is a real subprocess run of an experiment script on digits.

Kill at random points (also during a save) and resume bit-identically; corrupt the newest
checkpoint and complete on the same work directory (twice); two runs on one work directory;
a shorter method list; divergence; bad inputs that must give one line and leave nothing that
blocks the corrected rerun.
"""

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

TRAIN = ("train.py", "digits.py")
EPOCHS = 12


def _last_line(result):
    return result.stderr.strip().splitlines()[-1]


def _checkpoint_epochs(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _final_state(workdir):
    """The newest checkpoint's raw arrays (no template needed to compare two runs)."""
    epoch = _checkpoint_epochs(workdir)[-1]
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(epoch), "state")
    return epoch, ocp.StandardCheckpointer().restore(path)


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(experiment, tmp_path_factory):
    """An uninterrupted run of EPOCHS epochs: (epoch, state) of its last checkpoint."""
    workdir = tmp_path_factory.mktemp("reference")
    result = experiment(*TRAIN, workdir, f"--config.train.epochs={EPOCHS}")
    assert result.returncode == 0, result.stderr[-2000:]
    return (*_final_state(workdir), workdir)


def test_sigkill_at_random_points_resumes_bit_identically(experiment, reference, tmp_path):
    rng = np.random.default_rng(0)
    kills, during_save = 0, 0
    for _ in range(12):
        if kills >= 4:
            break
        process = experiment(*TRAIN, tmp_path, f"--config.train.epochs={EPOCHS}", wait=False)
        start, target = time.monotonic(), rng.uniform(0.0, 1.0)
        killed = False
        while process.poll() is None and time.monotonic() - start < 120:
            epochs = _checkpoint_epochs(tmp_path)
            # A step directory without its checksums is a save in progress: kill there when
            # we see one, else at a random time once training has started.
            saving = [
                e
                for e in epochs
                if not os.path.exists(tmp_path / "checkpoints" / str(e) / "checksums.json")
            ]
            started = os.path.exists(tmp_path / "config.json")
            if saving or (started and time.monotonic() - start > 1.0 + 3.0 * target):
                process.send_signal(signal.SIGKILL)
                process.wait()
                killed, kills, during_save = True, kills + 1, during_save + bool(saving)
                break
            time.sleep(0.002)
        if not killed:
            process.wait()
            process.communicate()
            break  # it finished before a kill landed
        process.communicate()
    assert kills >= 2, "no kill landed while the run was going"
    final = experiment(*TRAIN, tmp_path, f"--config.train.epochs={EPOCHS}")
    assert final.returncode == 0, final.stderr[-2000:]
    epoch, state = _final_state(tmp_path)
    assert epoch == reference[0]
    _assert_same_state(state, reference[1])
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))  # each epoch once


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_newest_checkpoint_falls_back_and_completes_twice(
    experiment, reference, tmp_path, damage
):
    tmp_path = tmp_path / "run"  # a finished run: a copy of the reference's work directory
    shutil.copytree(reference[2], tmp_path)
    newest = tmp_path / "checkpoints" / str(EPOCHS - 1) / "state"
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 16)
    target = max(files, key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: size // 2])
    else:  # same size, other bytes: only the checksums can tell
        target.write_bytes(bytes(255 - b for b in target.read_bytes()))
        assert target.stat().st_size == size
    resumed = experiment(*TRAIN, tmp_path, f"--config.train.epochs={EPOCHS}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "could not be restored" in resumed.stderr and "moved to" in resumed.stderr
    assert len(os.listdir(tmp_path / "checkpoints.corrupt")) == 1  # kept, not deleted
    assert f"resuming after epoch {EPOCHS - 1}" in resumed.stderr  # the last epoch is redone
    _assert_same_state(_final_state(tmp_path)[1], reference[1])
    again = experiment(*TRAIN, tmp_path, f"--config.train.epochs={EPOCHS}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "could not be restored" not in again.stderr


def test_two_runs_on_one_workdir_one_refused_and_a_killed_lock_is_not_stale(experiment, tmp_path):
    first = experiment(*TRAIN, tmp_path, "--config.train.epochs=200", wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "config.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = experiment(*TRAIN, tmp_path, "--config.train.epochs=200")
        assert second.returncode == 2
        assert "is in use by process" in _last_line(second), second.stderr[-1000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    after_kill = experiment(*TRAIN, tmp_path, "--config.train.epochs=2")
    assert after_kill.returncode == 2  # refused for its changed config, not for the lock
    assert "different train config" in _last_line(after_kill)


def test_nan_stops_with_one_line_and_keeps_a_finite_checkpoint(experiment, tmp_path):
    # lr 40 diverges in epoch 3 or 4 on digits (grad norm ~2e3 in epoch 2, ~2e6 in epoch 3,
    # then NaN; which epoch depends on float rounding).
    result = experiment(
        *TRAIN, tmp_path, "--config.train.epochs=6", "--config.train.learning_rate=40.0"
    )
    assert result.returncode == 2
    line = _last_line(result)
    found = re.match(r"error: train: non-finite .* in epoch (\d+);", line)
    assert found and 3 <= int(found[1]) <= 5, line
    bad = int(found[1])
    assert f"last good checkpoint (epoch {bad - 1})" in line, line
    epoch, state = _final_state(tmp_path)
    assert epoch == bad - 2  # checkpoint directories count epochs from 0
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


TINY = "digits_unlearn.py:tiny"


def test_shorter_method_list_keeps_rows_and_stale_retrain_is_redone(experiment, tmp_path):
    methods = "--config.run_methods=('Retrain','FT','GA')"
    first = experiment("unlearn.py", TINY, tmp_path, methods, "--config.sweep_fractions=()")
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["method"] for r in rows} == {"Original", "Retrain", "FT", "GA"}
    assert all(r["code"] for r in rows)
    shorter = experiment(
        "unlearn.py",
        TINY,
        tmp_path,
        "--config.run_methods=('Retrain','FT')",
        "--config.sweep_fractions=()",
        "--config.retrain.epochs=2",
    )
    assert shorter.returncode == 0, shorter.stderr[-2000:]
    after = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["method"] for r in after} == {"Original", "Retrain", "FT", "GA"}  # GA kept
    old = next(r for r in rows if r["method"] == "Retrain")
    new = next(r for r in after if r["method"] == "Retrain")
    assert new["fingerprint"] != old["fingerprint"]  # the changed recipe is its own run
    assert len([r for r in new["history"] if r["phase"] == "Retrain"]) == 2
    assert new["metrics"]["run_time_s"] > 0
    assert "Retrain 1/2" in shorter.stderr  # trained anew, not restored
    # A table over rows of different code says so.
    results = json.loads((tmp_path / "results.json").read_text())
    for run in results["runs"]:
        if run["method"] == "GA":
            run["code"] = "0.1.0+0123456789ab"
    (tmp_path / "results.json").write_text(json.dumps(results))
    rerun = experiment(
        "unlearn.py",
        TINY,
        tmp_path,
        "--config.run_methods=('Retrain','FT')",
        "--config.sweep_fractions=()",
        "--config.retrain.epochs=2",
    )
    assert rerun.returncode == 0
    assert "Note: these rows come from 2 code versions" in (tmp_path / "results.md").read_text()


def test_diverging_unlearning_names_the_method(experiment, tmp_path):
    result = experiment(
        "unlearn.py",
        TINY,
        tmp_path,
        "--config.run_methods=('GA',)",
        "--config.sweep_fractions=()",
        "--config.methods.GA.learning_rate=1e9",
    )
    assert result.returncode == 2
    line = _last_line(result)
    # Caught in training (a non-finite loss or weight) or, when only the last update blew the
    # weights up, by the evaluation (non-finite outputs): either way one line naming GA.
    assert line.startswith("error: seed 1: GA: non-finite"), line
    assert "epoch 1" in line or "lower the learning rate" in line, line
    assert "Traceback" not in result.stderr


QUICK = ("--config.run_methods=('FT',)", "--config.sweep_fractions=()")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.model=resnet19", "unknown model 'resnet19'"),
        ("--config.train.width=0", "TrainConfig.width must be in (0, inf), got 0.0"),
        ("--config.train.batch_size=0", "TrainConfig.batch_size must be >= 1, got 0"),
        ("--config.unlearn.batch_size=0", "UnlearnConfig.batch_size must be >= 1, got 0"),
    ],
)
def test_bad_input_gives_one_line_and_leaves_nothing(experiment, tmp_path, override, message):
    _refused_leaving_nothing(experiment, tmp_path, override, message)


def test_typos_that_used_to_poison_the_workdir_do_not_block_the_fixed_rerun(experiment, tmp_path):
    _refused_leaving_nothing(
        experiment, tmp_path, "--config.dataset=digitz", "unknown data set 'digitz'"
    )
    _refused_leaving_nothing(
        experiment,
        tmp_path,
        "--config.split.forget_fraction=0.0001",
        "forget_fraction 0.0001 of",
    )
    fixed = experiment("unlearn.py", TINY, tmp_path, *QUICK)  # one rerun after both
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def _refused_leaving_nothing(experiment, workdir, override, message):
    bad = experiment("unlearn.py", TINY, workdir, *QUICK, override)
    assert bad.returncode == 2
    line = _last_line(bad)
    assert line.startswith("error: ") and message in line, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    assert not (workdir / "config.json").exists()
    assert not list(workdir.rglob("split.npz"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("split.npz", b"PK\x03\x04 truncated", "is unreadable"),
        ("config.json", b'{"dataset": "dig', "config.json is unreadable"),
    ],
)
def test_damaged_workdir_files_give_one_line(experiment, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    if name == "split.npz":  # a config.json that matches, so the split is what is read
        ok = experiment(*TRAIN, tmp_path / "ok", "--config.train.epochs=1")
        assert ok.returncode == 0
        (tmp_path / "config.json").write_bytes((tmp_path / "ok" / "config.json").read_bytes())
    bad = experiment(*TRAIN, tmp_path, "--config.train.epochs=1")
    assert bad.returncode == 2
    line = _last_line(bad)
    assert line.startswith("error: ") and message in line and name in line, line
