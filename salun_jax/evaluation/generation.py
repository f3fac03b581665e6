"""Evaluating class unlearning in a conditional DDPM with a classifier trained on the same data.

  * UA (unlearning accuracy): the share of samples generated for the forgotten class that the
    classifier does NOT assign to it (paper: 1 - "accuracy of forgotten class").
  * Retained-class accuracy: per retained class, the classifier's accuracy on samples generated
    for that class (does the model still draw the other classes?).
  * FD (classifier features): the Frechet distance between Gaussians fitted to the classifier's
    penultimate features of real and of generated images of the retained classes. This is NOT
    FID: upstream computes FID with Inception-v3 pool features on 45k samples; here the feature
    extractor is our own small classifier, so values are comparable only within one run.
  * PNG grids of samples, one row per class, labelled, under a title (e.g. the method).

All percentages are in [0, 100], as in the classification half.

References:
  Fan et al. 2024 (SalUn) Tab. 4 (UA and FID for class-wise forgetting in DDPM); Heusel et al.
  2017 (Frechet distance of Gaussians); upstream `DDPM/runners/diffusion.py::sample_fid`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from salun_jax.diffusion.samplers import check_null_class, ddim_sample, to_uint8
from salun_jax.diffusion.schedule import NoiseSchedule
from salun_jax.train_diffusion import uncommitted
from salun_jax.types import PyTree


def generate_samples(
    apply_fn: Callable[..., jax.Array],
    params: PyTree,
    schedule: NoiseSchedule,
    labels: np.ndarray,
    rng: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    num_steps: int | None = None,
    eta: float = 1.0,
    guidance_scale: float = 2.0,
    batch_size: int = 500,
) -> np.ndarray:
    """DDIM samples for the given class labels, as uint8 images.

    Chunks of `batch_size` (the last one padded, so one compilation serves every chunk); chunk i
    uses `fold_in(rng, i)`.

    Args:
      apply_fn: `UNet.apply`.
      params: model parameters.
      schedule: the training noise schedule.
      labels: [N] int class ids.
      rng: key.
      image_shape: (H, W, C).
      num_steps: DDIM steps (None: all T, the paper's setting).
      eta: 1.0 as the paper's sampling config; 0 is deterministic DDIM.
      guidance_scale: CFG w (2.0 in the paper).
      batch_size: images per sampler call.

    Returns:
      uint8 [N, H, W, C].

    Raises:
      ValueError: guidance on a model without a null class, or labels out of range.
    """
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if guidance_scale != 0:
        check_null_class(params, f"sampling with guidance_scale={guidance_scale}")
    batch_size = min(batch_size, labels.size)
    params = uncommitted(params)  # one compilation for params from `fit` and from elsewhere
    out = []
    for i, start in enumerate(range(0, labels.size, batch_size)):
        chunk = labels[start : start + batch_size]
        valid = chunk.size
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.full(batch_size - valid, chunk[0], np.int32)])
        images = ddim_sample(
            apply_fn,
            params,
            schedule,
            jax.random.fold_in(rng, i),
            chunk,
            image_shape=image_shape,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
        )
        out.append(np.asarray(to_uint8(images))[:valid])
    return np.concatenate(out)


def unlearning_accuracy(predictions: np.ndarray, forget_class: int) -> float:
    """UA in percent: share of the forget class's samples NOT classified as `forget_class`.

    Args:
      predictions: [N] predicted classes of samples generated for the forgotten class.
      forget_class: the forgotten class.
    """
    predictions = np.asarray(predictions)
    if predictions.size == 0:
        raise ValueError("no predictions")
    return float(100.0 * np.mean(predictions != forget_class))


def class_accuracies(
    predictions: np.ndarray, labels: np.ndarray, classes: Sequence[int] | None = None
) -> dict[int, float]:
    """Per-class accuracy in percent: {class: share of samples of `class` predicted as it}.

    Args:
      predictions: [N] predicted classes.
      labels: [N] the classes the samples were generated for.
      classes: which classes (default: those present in labels). A class without samples is NaN.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"shape mismatch: {predictions.shape} vs {labels.shape}")
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    out = {}
    for k in classes:
        hit = predictions[labels == k] == k
        out[int(k)] = float(100.0 * np.mean(hit)) if hit.size else float("nan")
    return out


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as pytorch-fid's `np.cov`) in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(
        features.shape[1], features.shape[1]
    )


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Tr((sigma1 sigma2)^(1/2)) is computed as Tr((s1^(1/2) sigma2 s1^(1/2))^(1/2)) with symmetric
    eigendecompositions (the matrices are similar, and the second one is symmetric PSD), which
    never goes complex and needs no `sqrtm` offset, unlike pytorch-fid's `scipy.linalg.sqrtm`.

    Returns:
      The distance (>= 0 up to round-off; clipped at 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size,) * 2:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}"
        )
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0)))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def classifier_frechet_distance(real_features: np.ndarray, generated_features: np.ndarray) -> float:
    """ "FD (classifier features)": the Frechet distance between Gaussians fitted to two feature
    sets [N, D] (penultimate features of our own classifier; not FID, see the module doc)."""
    return frechet_distance(
        *feature_statistics(real_features), *feature_statistics(generated_features)
    )


def evaluate_samples(
    predict_fn: Callable,
    classifier_variables: PyTree,
    samples: np.ndarray,
    sample_labels: np.ndarray,
    forget_class: int,
    num_classes: int,
    real_features: np.ndarray | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """UA, per-class and retained-class accuracy, and FD of generated samples.

    Args:
      predict_fn: `train.make_predict_fn(classifier.apply, return_features=True)`.
      classifier_variables: its variables.
      samples: uint8 [N, H, W, C] generated images.
      sample_labels: [N] the classes they were generated for.
      forget_class: the forgotten class.
      num_classes: K.
      real_features: [M, D] classifier features of real images of the retained classes (for FD;
        None skips FD).
      batch_size: classifier batch size.

    Returns:
      {"UA", "forget_class_accuracy", "retain_accuracy" (mean over retained classes),
       "per_class_accuracy" {class: %}, "FD" (or None)}.
    """
    from salun_jax.evaluation.classification import predict

    sample_labels = np.asarray(sample_labels)
    logits, features = predict(predict_fn, classifier_variables, samples, batch_size)
    predictions = np.argmax(logits, axis=-1)
    per_class = class_accuracies(predictions, sample_labels, range(num_classes))
    retained = [k for k in range(num_classes) if k != forget_class]
    is_forget = sample_labels == forget_class
    result = {
        "UA": unlearning_accuracy(predictions[is_forget], forget_class)
        if is_forget.any()
        else float("nan"),
        "forget_class_accuracy": per_class[forget_class],
        "retain_accuracy": float(np.nanmean([per_class[k] for k in retained])),
        "per_class_accuracy": {str(k): v for k, v in per_class.items()},
        "FD": None,
    }
    if real_features is not None and (~is_forget).sum() >= 2:
        result["FD"] = classifier_frechet_distance(real_features, features[~is_forget])
    return result


MIN_CELL_PX = 32  # grids upscale each sample (integer factor) to at least this many pixels
MAX_LABEL_CHARS = 48  # longer row labels (prompts) are cut, with "..."


def _grid_font(size: int):
    """Pillow's bundled font at `size` px (no font files needed); its fixed bitmap font where
    this Pillow has no FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - min(left, 0)), int(bottom - min(top, 0))


def _cut(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def grid_scale(image_hw: tuple[int, int], scale: int = 1, min_cell_px: int = MIN_CELL_PX) -> int:
    """The integer upscaling factor of a grid's cells: at least `scale`, and enough that the
    longer side of a cell reaches `min_cell_px` (8x8 digits: 4, 28x28: 2, 512x512: `scale`)."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return max(int(scale), -(-int(min_cell_px) // max(image_hw)) if min_cell_px > 0 else 1)


def render_sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    per_class: int = 10,
    scale: int = 4,
    padding: int = 1,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    min_cell_px: int = MIN_CELL_PX,
    annotate: bool = True,
) -> np.ndarray:
    """The picture `save_sample_grid` writes, as uint8 [H, W] (grey samples) or [H, W, 3].

    Row k holds the first `per_class` samples of class k, each upscaled by
    `grid_scale((h, w), scale, min_cell_px)` with nearest neighbour, `padding` white pixels
    between cells. With `annotate`, each row's label is drawn (black on white, right-aligned)
    in a column to the left of the cells and `title` (if any) in a band above; the cells then
    sit in the bottom-right corner of the picture, exactly as without `annotate`.

    Args:
      images: uint8 [N, H, W, C] (C = 1 or 3).
      labels: [N] the row (class) of each sample.
      num_classes: rows.
      per_class: columns; missing samples stay white.
      scale: the smallest upscaling factor.
      padding: pixels between cells (white).
      row_labels: one label per row (class name, prompt); None: "class 0", "class 1", ...
        Labels longer than `MAX_LABEL_CHARS` are cut.
      title: drawn above the grid; None or "": no title band.
      min_cell_px: the smallest cell side in pixels the upscaling aims for (0: `scale` alone).
      annotate: False gives the bare cells (no labels, no title).

    Raises:
      ValueError: images not uint8 [N, H, W, 1 or 3]; `row_labels` not one per row.
    """
    from PIL import Image, ImageDraw

    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N, H, W, 1 or 3], got {images.dtype} {images.shape}"
        )
    if row_labels is None:
        row_labels = [f"class {k}" for k in range(num_classes)]
    row_labels = [_cut(label) for label in row_labels]
    if len(row_labels) != num_classes:
        raise ValueError(f"row_labels must hold {num_classes} labels, got {len(row_labels)}")
    h, w, c = images.shape[1:]
    factor = grid_scale((h, w), scale, min_cell_px)
    cell_h, cell_w = h * factor + padding, w * factor + padding
    grid = np.full((num_classes * cell_h + padding, per_class * cell_w + padding, c), 255, np.uint8)
    for k in range(num_classes):
        for j, index in enumerate(np.flatnonzero(labels == k)[:per_class]):
            cell = np.repeat(np.repeat(images[index], factor, axis=0), factor, axis=1)
            top, left = padding + k * cell_h, padding + j * cell_w
            grid[top : top + h * factor, left : left + w * factor] = cell
    grid = grid[..., 0] if c == 1 else grid
    if not annotate:
        return grid

    # Text about 40% of a cell's height (12 px at the 32 px minimum, at most 40 px).
    size = int(np.clip(round(0.4 * h * factor), 12, 40))
    font, title_font = _grid_font(size), _grid_font(int(size * 1.3))
    margin = max(4, size // 2)
    label_w = max(_text_size(font, label)[0] for label in row_labels) + 2 * margin
    title = _cut(title or "", 2 * MAX_LABEL_CHARS)
    title_w = _text_size(title_font, title)[0] if title else 0
    title_h = _text_size(title_font, "Agjy")[1]  # one height for every title: equal-sized grids
    band = title_h + 2 * margin if title else 0
    label_w = max(label_w, title_w + 2 * margin - grid.shape[1])  # a wide title widens the left
    canvas = Image.new(
        "L" if c == 1 else "RGB",
        (label_w + grid.shape[1], band + grid.shape[0]),
        255 if c == 1 else (255, 255, 255),
    )
    canvas.paste(Image.fromarray(grid), (label_w, band))
    draw, ink = ImageDraw.Draw(canvas), 0 if c == 1 else (0, 0, 0)

    def text(x: float, y: float, string: str, font, align_right: bool) -> None:
        # Anchors by hand (right or centre, vertically centred): bitmap fonts have none.
        left, top, right, bottom = font.getbbox(string)
        x = x - right if align_right else x - (left + right) / 2
        draw.text((round(x), round(y - (top + bottom) / 2)), string, fill=ink, font=font)

    for k, label in enumerate(row_labels):
        text(label_w - margin, band + padding + k * cell_h + h * factor / 2, label, font, True)
    if title:
        text(canvas.width / 2, band / 2, title, title_font, False)
    return np.asarray(canvas)


def save_sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    *,
    num_classes: int,
    per_class: int = 10,
    scale: int = 4,
    padding: int = 1,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    min_cell_px: int = MIN_CELL_PX,
    annotate: bool = True,
) -> str:
    """Writes a PNG grid, atomically: row k holds the first `per_class` samples generated for
    class k, labelled on the left, under a title (`render_sample_grid` draws it).

    Only the picture is made here: the samples themselves are not changed or saved.

    Args:
      images: uint8 [N, H, W, C] (C = 1 or 3).
      labels: [N] the class of each sample.
      path: destination (parent folders created).
      num_classes: rows.
      per_class: columns; missing samples stay white.
      scale: the smallest nearest-neighbour upscaling of each image; raised until a cell is
        `min_cell_px` pixels on its longer side.
      padding: pixels between cells (white).
      row_labels: one label per row (class name or prompt); None: "class k".
      title: drawn above the grid; None: the file's name without ".png" (the method, for
        `grids/<method>.png`); "": none.
      min_cell_px: see `scale` (0: `scale` exactly).
      annotate: False writes the bare cells, without labels or title.

    Returns:
      The path written.
    """
    from PIL import Image

    path = os.fspath(path)
    if title is None:
        title = os.path.splitext(os.path.basename(path))[0]
    picture = render_sample_grid(
        images,
        labels,
        num_classes=num_classes,
        per_class=per_class,
        scale=scale,
        padding=padding,
        row_labels=row_labels,
        title=title,
        min_cell_px=min_cell_px,
        annotate=annotate,
    )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    )
    try:
        Image.fromarray(picture).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def samples_per_class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """[num_classes * per_class] labels 0,0,...,1,1,... (per_class of each class)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
