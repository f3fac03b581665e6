"""Tests for salun_jax.report: results JSON, summaries, the markdown table, plots."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(method, seed, ua, mia, ra, ta, run_time=None):
    metrics = {"UA": ua, "MIA": mia, "RA": ra, "TA": ta}
    if run_time is not None:
        metrics["run_time_s"] = run_time
    return {"method": method, "seed": seed, "metrics": metrics}


# FT listed first on purpose: the table must still put the reference first.
RUNS = [
    _run("FT", 1, 1.0, 2.0, 99.0, 93.0, 2.0),
    _run("Retrain", 1, 5.0, 12.0, 100.0, 94.0, 40.0),
    _run("FT", 2, 2.0, 4.0, 99.5, 94.0, 3.0),
    _run("Retrain", 2, 6.0, 14.0, 100.0, 95.0, 44.0),
]


# ------------------------------------------------------------------------------------------------
# summarize / markdown_table.


def test_summarize_hand_computed():
    summary = report.summarize(RUNS)
    assert list(summary) == ["FT", "Retrain"]  # first appearance
    retrain, ft = summary["Retrain"], summary["FT"]
    assert retrain["n_runs"] == 2 and retrain["seeds"] == [1, 2]
    assert retrain["mean"] == pytest.approx(
        {"UA": 5.5, "MIA": 13.0, "RA": 100.0, "TA": 94.5, "run_time_s": 42.0}
    )
    # ddof=0: std of {5, 6} is 0.5 (ddof=1 would give 0.707).
    assert retrain["std"] == pytest.approx(
        {"UA": 0.5, "MIA": 1.0, "RA": 0.0, "TA": 0.5, "run_time_s": 2.0}
    )
    assert ft["mean"] == pytest.approx(
        {"UA": 1.5, "MIA": 3.0, "RA": 99.25, "TA": 93.5, "run_time_s": 2.5}
    )
    assert ft["std"] == pytest.approx(
        {"UA": 0.5, "MIA": 1.0, "RA": 0.25, "TA": 0.5, "run_time_s": 0.5}
    )
    assert ft["gap"] == pytest.approx({"UA": 4.0, "MIA": 10.0, "RA": 0.75, "TA": 1.0})
    assert ft["avg_gap"] == pytest.approx(3.9375)
    assert retrain["avg_gap"] == 0.0
    assert retrain["gap"] == {"UA": 0.0, "MIA": 0.0, "RA": 0.0, "TA": 0.0}


EXPECTED_TABLE = """\
| Method | UA | MIA | RA | TA | Avg. Gap | RTE (s) |
|---|---|---|---|---|---|---|
| Retrain | 5.50±0.50 | 13.00±1.00 | 100.00±0.00 | 94.50±0.50 | 0.00 | 42.00 |
| FT | 1.50±0.50 (4.00) | 3.00±1.00 (10.00) | 99.25±0.25 (0.75) | 93.50±0.50 (1.00) | 3.94 | 2.50 |
"""


def test_markdown_table_hand_computed():
    assert report.markdown_table(report.summarize(RUNS)) == EXPECTED_TABLE


def test_markdown_table_options():
    summary = report.summarize(RUNS)
    minutes = report.markdown_table(summary, time_unit="min").splitlines()
    assert minutes[0].endswith("| RTE (min) |")
    assert minutes[2].endswith("| 0.00 | 0.70 |")  # 42 s
    no_reference = report.markdown_table(summary, reference_method=None, keys=("UA",))
    assert no_reference.splitlines() == [
        "| Method | UA | RTE (s) |",
        "|---|---|---|",
        "| FT | 1.50±0.50 | 2.50 |",
        "| Retrain | 5.50±0.50 | 42.00 |",
    ]


def test_paper_ft_row_format():
    runs = [
        _run("Retrain", 0, 5.24, 12.88, 100.00, 94.26),
        _run("FT", 0, 0.63, 2.13, 99.88, 94.06),
    ]
    table = report.markdown_table(report.summarize(runs, "Retrain"), reference_method="Retrain")
    ft_row = "| FT | 0.63±0.00 (4.61) | 2.13±0.00 (10.75) | 99.88±0.00 (0.12) | 94.06±0.00 (0.20) "
    assert ft_row in table
    assert table.splitlines()[-1].endswith("| 3.92 | n/a |")  # no run time recorded


def test_summarize_rejects_bad_runs():
    with pytest.raises(ValueError, match="runs is empty"):
        report.summarize([])
    with pytest.raises(ValueError, match=r"Reference method 'Retrain' has no runs; .*\['FT'\]"):
        report.summarize(RUNS[:1])
    with pytest.raises(ValueError, match=r"lacks metric keys \['TA'\]"):
        report.summarize([{"method": "FT", "seed": 0, "metrics": {"UA": 1, "MIA": 1, "RA": 1}}])
    with pytest.raises(ValueError, match="two runs with seed 1"):
        report.summarize(RUNS + [RUNS[0]])
    with pytest.raises(ValueError, match="'method' and 'metrics'"):
        report.summarize([{"seed": 0}])
    with pytest.raises(ValueError, match="not in the summary"):
        report.markdown_table(report.summarize(RUNS[:1], reference_method=None))
    with pytest.raises(ValueError, match="time_unit"):
        report.markdown_table(report.summarize(RUNS), time_unit="h")


# ------------------------------------------------------------------------------------------------
# Results JSON.


def test_write_results_round_trip(tmp_path):
    results = {
        "method": "salun",
        "metrics": {"UA": np.float32(2.5), "RA": np.float64(99.5), "n": np.int64(7)},
        "per_class": np.array([1.0, 2.0]),
        "device_array": jnp.arange(3),
        "nested": ({"a": (1, 2)}, [np.bool_(True)]),
        7: "int key",
        "path": tmp_path / "x",
    }
    path = report.write_results(tmp_path / "sub" / "results.json", results)
    assert path == tmp_path / "sub" / "results.json"
    assert report.read_results(path) == {
        "method": "salun",
        "metrics": {"UA": 2.5, "RA": 99.5, "n": 7},
        "per_class": [1.0, 2.0],
        "device_array": [0, 1, 2],
        "nested": [{"a": [1, 2]}, [True]],
        "7": "int key",
        "path": str(tmp_path / "x"),
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp files


def test_write_results_failure_leaves_old_file(tmp_path):
    path = report.write_results(tmp_path / "results.json", {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        report.write_results(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ------------------------------------------------------------------------------------------------
# Plots.


def test_plot_sweep_writes_png(tmp_path):
    fractions = [0.1, 0.3, 0.5]
    series = {
        "UA": [1.0, 2.0, 3.0],
        "RA": [99.0, 98.0, 97.0],
        "TA": [94, 93, 92],
        "MIA": [5, 9, 12],
    }
    path = report.plot_sweep(fractions, series, tmp_path / "plots" / "sweep.png", title="sweep")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    with pytest.raises(ValueError, match="differ from len"):
        report.plot_sweep(fractions, {"UA": [1.0]}, tmp_path / "bad.png")


def test_plot_layer_saliency_writes_png(tmp_path):
    names = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    path = report.plot_layer_saliency(names, [0.1, 0.5, 0.0, 1.0], tmp_path / "layers.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    with pytest.raises(ValueError, match="4 layer names but 3 fractions"):
        report.plot_layer_saliency(names, [0.1, 0.2, 0.3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report.plot_layer_saliency(["fc"], [1.5], tmp_path / "bad.png")
