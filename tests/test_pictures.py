"""Pictures a person can read: labelled, titled sample grids and the plot of the main table."""

import os

import numpy as np
import pytest
from PIL import Image

from salun_jax import report
from salun_jax.evaluation import sd
from salun_jax.evaluation.generation import (
    MIN_CELL_PX,
    grid_scale,
    render_sample_grid,
    save_sample_grid,
)


def _digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_grid_scale_reaches_the_minimum_cell():
    assert grid_scale((8, 8), scale=2) == 4  # 8x8 digits: 32 px cells
    assert grid_scale((8, 8), scale=5) == 5  # a larger scale is kept
    assert grid_scale((28, 28), scale=1) == 2
    assert grid_scale((512, 512), scale=1) == 1
    assert grid_scale((8, 8), scale=2, min_cell_px=0) == 2
    with pytest.raises(ValueError):
        grid_scale((8, 8), scale=0)


def test_labelled_grid_size_cells_and_text(tmp_path):
    images, labels = _digits(6), np.array([0, 0, 1, 1, 2, 2])
    path = save_sample_grid(
        images, labels, tmp_path / "grids" / "SalUn.png", num_classes=3, per_class=2, scale=2
    )
    assert path == os.fspath(tmp_path / "grids" / "SalUn.png")
    assert [p.name for p in (tmp_path / "grids").iterdir()] == ["SalUn.png"]  # no temporary left
    with Image.open(path) as picture:
        assert picture.mode == "L"
        pixels = np.asarray(picture)
    factor = 4  # the 32 px minimum over scale 2
    cell = 8 * factor + 1
    grid_h, grid_w = 3 * cell + 1, 2 * cell + 1
    height, width = pixels.shape
    label_w, band = width - grid_w, height - grid_h
    assert label_w > 20 and band > 10  # a label column and a title band around the cells
    # The cells sit in the bottom-right corner, exactly the bare grid: upscaled samples.
    bare = render_sample_grid(images, labels, num_classes=3, per_class=2, scale=2, annotate=False)
    assert bare.shape == (grid_h, grid_w)
    np.testing.assert_array_equal(pixels[band:, label_w:], bare)
    first = pixels[band + 1 : band + 33 : factor, label_w + 1 : label_w + 33 : factor]
    np.testing.assert_array_equal(first, images[0, ..., 0])  # row 0, column 0
    # Text: dark pixels in every row's label slot and in the title band; white elsewhere.
    for k in range(3):
        slot = pixels[band + 1 + k * cell : band + (k + 1) * cell, :label_w]
        assert (slot < 128).sum() > 10, f"row {k} has no label"
    assert (pixels[:band, :] < 128).sum() > 10, "no title"
    assert (pixels[band:, :3] == 255).all()  # a white margin left of the labels


def test_grid_labels_and_title_are_drawn_as_given(tmp_path):
    images, labels = _digits(4), np.array([0, 0, 1, 1])
    kwargs = dict(num_classes=2, per_class=2, scale=4)
    short = render_sample_grid(images, labels, row_labels=["0", "1"], title="", **kwargs)
    long = render_sample_grid(images, labels, row_labels=["0 (forgotten)", "1"], title="", **kwargs)
    titled = render_sample_grid(images, labels, row_labels=["0", "1"], title="GA", **kwargs)
    assert short.shape[0] == long.shape[0] == 2 * 33 + 1  # no title band
    assert long.shape[1] > short.shape[1]  # a longer label widens the column
    assert titled.shape[0] > short.shape[0] and titled.shape[1] == short.shape[1]
    wide = render_sample_grid(images, labels, title="a title much wider than the grid", **kwargs)
    np.testing.assert_array_equal(wide[-67:, -67:], short[:, -67:])  # cells stay bottom-right
    with pytest.raises(ValueError, match="must hold 2 labels"):
        render_sample_grid(images, labels, row_labels=["only one"], **kwargs)
    with pytest.raises(ValueError, match="uint8"):
        save_sample_grid(images.astype(np.float32), labels, tmp_path / "x.png", num_classes=2)


def test_one_row_grid_and_colour_images(tmp_path):
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :, :, 0] = 200
    path = save_sample_grid(
        images, np.array([0]), tmp_path / "one.png", num_classes=1, per_class=1, scale=1
    )
    with Image.open(path) as picture:
        assert picture.mode == "RGB"
        pixels = np.asarray(picture)
    assert pixels.shape[0] > MIN_CELL_PX + 2 and pixels.shape[1] > MIN_CELL_PX + 2
    np.testing.assert_array_equal(pixels[-33:-1, -33:-1], np.broadcast_to([200, 0, 0], (32, 32, 3)))
    left = pixels[-34:, : pixels.shape[1] - 34]
    assert (left < 128).all(axis=-1).sum() > 10, "the default label 'class 0' is missing"
    # A class without samples leaves white cells; the bare grid without labels is as before.
    bare = np.asarray(
        Image.open(
            save_sample_grid(
                images,
                np.array([1]),
                tmp_path / "bare.png",
                num_classes=1,
                per_class=1,
                scale=1,
                min_cell_px=0,
                annotate=False,
            )
        )
    )
    assert bare.shape == (10, 10, 3) and (bare == 255).all()


def test_before_after_grid_draws_its_captions(tmp_path):
    before = np.zeros((2, 3, 4, 4, 3), np.uint8)
    after = np.full((2, 3, 4, 4, 3), 200, np.uint8)
    path = tmp_path / "grid.png"
    captions = sd.save_before_after_grid({"before": before, "after": after}, ["a", "b"], path)
    picture = np.asarray(Image.open(path))
    cell = 4 * 8 + 2  # 4 px upscaled to 32, padding 2
    assert picture.shape[0] > 4 * cell + 2 and picture.shape[1] > 3 * cell + 2
    corner = picture[-(4 * cell + 2) :, -(3 * cell + 2) :]
    assert [corner[2 + cell * r + 1, 3, 0] for r in range(4)] == [0, 0, 200, 200]
    slot_w = picture.shape[1] - (3 * cell + 2)
    top = picture.shape[0] - (4 * cell + 2)
    for r in range(len(captions)):
        slot = picture[top + 2 + r * cell : top + (r + 1) * cell, :slot_w]
        assert (slot < 128).all(axis=-1).sum() > 10, f"caption {captions[r]!r} is missing"


def _runs() -> list[dict]:
    base = {"UA": 5.0, "MIA": 12.0, "RA": 100.0, "TA": 94.0, "run_time_s": 10.0}
    runs = []
    for method, delta in [("Original", 4.0), ("Retrain", 0.0), ("FT", 2.0), ("SalUn", 0.5)]:
        for seed in (1, 2):
            metrics = {k: v + (delta * seed if k != "run_time_s" else 0.0) for k, v in base.items()}
            runs.append({"method": method, "seed": seed, "metrics": metrics})
    return runs


def test_plot_gaps_writes_a_png(tmp_path):
    summary = report.summarize(_runs())
    path = report.plot_gaps(summary, tmp_path / "plots" / "gaps.png", title="digits, class 0")
    assert path == tmp_path / "plots" / "gaps.png"
    assert [p.name for p in path.parent.iterdir()] == ["gaps.png"]  # no temporary left
    with Image.open(path) as picture:
        width, height = picture.size
        pixels = np.asarray(picture.convert("L"))
    assert 600 <= width <= 2000 and 400 <= height <= 800
    assert (pixels < 128).mean() > 0.01  # bars, text and axes are drawn
    # All gaps zero (every method equals Retrain) still plots.
    flat = [dict(r, metrics=dict(r["metrics"], UA=1.0, MIA=1.0, RA=1.0, TA=1.0)) for r in _runs()]
    report.plot_gaps(report.summarize(flat), tmp_path / "flat.png")
    assert (tmp_path / "flat.png").stat().st_size > 1000


def test_plot_gaps_rejects_a_summary_without_gaps(tmp_path):
    with pytest.raises(ValueError, match="no gaps"):
        report.plot_gaps(report.summarize(_runs(), reference_method=None), tmp_path / "g.png")
    retrain_only = [r for r in _runs() if r["method"] == "Retrain"]
    with pytest.raises(ValueError, match="only 'Retrain'"):
        report.plot_gaps(report.summarize(retrain_only), tmp_path / "g.png")
    with pytest.raises(ValueError, match="empty"):
        report.plot_gaps({}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="lack keys"):
        report.plot_gaps(report.summarize(_runs()), tmp_path / "g.png", keys=("UA", "FQ"))
    assert not (tmp_path / "g.png").exists()
