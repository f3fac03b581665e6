"""Load a classification data set into memory as numpy arrays.

Three kinds of source are understood by :func:`load_dataset`:

1. ``"digits"``: scikit-learn's bundled 8x8 digits (no download; the embedded default).
2. A tensorflow-datasets name (``cifar10``, ``cifar100``, ``svhn_cropped``, ``stl10``, ``mnist``,
   ``fashion_mnist``, or any other registered tfds builder with ``image`` and ``label`` features
   and ``train``/``test`` splits), read from array_record files through the builder's
   ``as_data_source`` (random access; TensorFlow is not needed to read prepared data). Data that
   is not prepared in ``data_dir`` is only downloaded after a quick check (at most
   ``_DOWNLOAD_PROBE_TIMEOUT_S`` seconds, no retries) that the builder's download hosts answer, so
   an offline machine fails in seconds, with a one-line message saying how to prepare the data
   elsewhere (the builders of the names above need TensorFlow to prepare them).
3. A path to an image folder or a ``.zip`` archive laid out ``split/class_name/image.ext``
   (optionally under one top-level folder). Decoded arrays are cached as an ``.npz`` file (see
   :func:`load_dataset`).

Decoding of folder/zip images (Pillow):

* Colour: RGB if any image of the source is colour (a grayscale image among them is replicated to
  three channels), else one channel. Alpha is dropped.
* 16-bit grayscale PNGs (Pillow modes ``I;16*`` and ``I``) are scaled to 8 bits by rounding
  ``value * 255 / 65535`` (so 8-bit data stored as ``value * 257`` comes back exactly).
* An image of more than ``_MAX_IMAGE_PIXELS`` pixels (2**26, 8192 x 8192) is refused from its
  header, before decoding (decompression bombs), naming the file (``archive.zip:member``).
* Files that are not taken (not .jpg/.jpeg/.png, not at ``split/class/file`` depth, hidden or
  macOS metadata, or under a split folder other than train/test) are named, with the reason, in
  one ``UserWarning`` per decode.
* Temporary cache files left by killed writers (``<stem>-<key>.npz.*.tmp``, over
  ``_ORPHAN_TEMP_AGE_S`` seconds old and not locked by a writer) are removed on the next load of
  a source with the same stem.

Every source gives a :class:`Dataset`: uint8 images ``[N, H, W, C]``, int32 labels ``[N]``, the
class names and per-channel mean/std of ``images / 255`` (the model normalises its input with them).

Errors: an unknown name raises ``ValueError``; a path that does not exist raises
``FileNotFoundError``; a source that exists but cannot be read (corrupt zip, bad layout, class
folders that differ between splits, images of different shapes, tfds data that is neither prepared
nor downloadable) raises :class:`DataSourceError`, a ``ValueError``. Messages are one line.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import io
import logging
import math
import os
import re
import tempfile
import threading
import time
import urllib.parse
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from salun_jax.cache_paths import resolve_cache_dir

__all__ = [
    "CIFAR10_CLASS_NAMES",
    "DATASET_STATS",
    "DataSourceError",
    "Dataset",
    "TFDS_DATASETS",
    "load_dataset",
]

_logger = logging.getLogger(__name__)

CIFAR10_CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Per-channel (mean, std) of images / 255 over the training split, as used by the SalUn code.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1201, 0.1231, 0.1052)),
}


class _TfdsSplits(NamedTuple):
    train: str
    test: str


# tensorflow-datasets names we support -> the tfds split names used as our train/test.
TFDS_DATASETS: dict[str, _TfdsSplits] = {
    "cifar10": _TfdsSplits("train", "test"),
    "cifar100": _TfdsSplits("train", "test"),
    "svhn_cropped": _TfdsSplits("train", "test"),
    "stl10": _TfdsSplits("train", "test"),
    "mnist": _TfdsSplits("train", "test"),
    "fashion_mnist": _TfdsSplits("train", "test"),
}

_DIGITS = "digits"
_DIGITS_TEST_FRACTION = 0.2
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_REQUIRED_SPLITS = ("train", "test")
# 2: colour decided over all images, 16-bit PNGs scaled (not clipped), oversized images refused.
_CACHE_FORMAT_VERSION = 2
_CACHE_KEYS = (
    "train_images", "train_labels", "test_images", "test_labels", "class_names", "mean", "std",
)  # fmt: skip
_TFDS_READ_BATCH = 1024
# A tfds builder name (no config or version): what load_dataset tries as a registered builder.
_TFDS_BUILDER_NAME = re.compile(r"[a-z][a-z0-9_]*")
# How long the check that a builder's download hosts answer may take, in all (no retries).
_DOWNLOAD_PROBE_TIMEOUT_S = 10.0
# Images with more pixels are refused from their header, before decoding (decompression bombs).
_MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 = 8192 x 8192; Pillow's own limit is 89,478,485.
# Cache temp files older than this and not locked by a writer are orphans of killed writes.
_ORPHAN_TEMP_AGE_S = 60.0
_SKIPPED_NAMES_SHOWN = 5  # Per reason, in the warning about skipped files.


class DataSourceError(ValueError):
    """A data source exists (or is a known name) but cannot be read into a :class:`Dataset`."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set held in memory.

    Arrays are made read-only on construction: copy before modifying (e.g. to relabel).
    Equality is identity (comparing arrays field by field is neither cheap nor well defined); use
    :meth:`fingerprint` to compare contents.

    Attributes:
      name: Short name (the tfds name, ``"digits"``, or the folder/zip file stem).
      train_images: uint8 ``[N, H, W, C]``.
      train_labels: int32 ``[N]``, in ``[0, num_classes)``.
      test_images: uint8 ``[M, H, W, C]``.
      test_labels: int32 ``[M]``.
      class_names: Name of each label id.
      mean: Per-channel mean of ``images / 255`` (for normalisation inside the model).
      std: Per-channel standard deviation of ``images / 255``.
    """

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for split in _REQUIRED_SPLITS:
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(f"{split}_images must be a uint8 array [N, H, W, C]")
            if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.ndim != 1:
                raise ValueError(f"{split}_labels must be an int32 array [N]")
            if len(images) != len(labels):
                raise ValueError(
                    f"{split}: {len(images)} images but {len(labels)} labels in {self.name!r}"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise ValueError(
                    f"{split} labels of {self.name!r} fall outside [0, {len(self.class_names)})"
                )
            images.flags.writeable = False
            labels.flags.writeable = False
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train images {self.train_images.shape[1:]} and test images "
                f"{self.test_images.shape[1:]} of {self.name!r} differ in shape"
            )
        channels = self.train_images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std of {self.name!r} need one value per channel ({channels})")

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        height, width, channels = self.train_images.shape[1:]
        return int(height), int(width), int(channels)

    def fingerprint(self) -> str:
        """A short hash of the whole content (name, class names, every label and pixel), stable
        across runs and machines: what the pipelines key stored models by, so images changed
        anywhere give another fingerprint. One sha256 pass (~0.1 s for CIFAR-10).

        Returns:
          16 hex digits of a sha256 digest.
        """
        from salun_jax.provenance import fingerprint

        return fingerprint(
            name=self.name,
            class_names=self.class_names,
            train=(self.train_images, self.train_labels),
            test=(self.test_images, self.test_labels),
        )


def load_dataset(
    source: str,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    download: bool = True,
) -> Dataset:
    """Loads a data set into memory.

    Folder and zip sources are decoded once and cached in ``cache_dir`` as
    ``<stem>-<key>.npz``, where the key hashes the source's absolute path, size and modification
    time (for a folder: every image file's relative path, size and mtime). A changed source gets a
    new key; an unreadable cache file is deleted and rebuilt with a warning; the cache is written
    atomically. Folder/zip images are ordered by class, then by file name within a class; labels
    are indices into the sorted class folder names.

    Args:
      source: ``"digits"``, a tensorflow-datasets name from :data:`TFDS_DATASETS` (or any other
        registered tfds builder name whose data have ``image`` and ``label`` (ClassLabel) features
        and ``train``/``test`` splits), or a path to an image folder or ``.zip`` archive laid out
        ``[top/]{train,test}/class_name/image.ext`` with ``ext`` one of jpg, jpeg, png. A leading
        ``~`` is expanded. An existing path wins over a tfds name outside ``TFDS_DATASETS``.
      data_dir: tfds data directory holding data prepared as array_record (tfds sources only;
        ``None`` means tfds's default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Config
        key ``data_dir`` in the scripts.
      cache_dir: Directory for decoded folder/zip caches. Defaults to ``$SALUN_JAX_CACHE``, else
        ``~/.cache/salun_jax``.
      download: For tfds sources, whether tfds may download and prepare a data set that is not
        in ``data_dir`` yet (after checking, within ``_DOWNLOAD_PROBE_TIMEOUT_S`` seconds, that
        its download hosts answer).

    Returns:
      The loaded :class:`Dataset`.

    Raises:
      ValueError: ``source`` is neither a known name nor something that looks like a path.
      FileNotFoundError: ``source`` looks like a path but does not exist.
      DataSourceError: The source exists but cannot be read (see the module docstring).
    """
    if source == _DIGITS:
        return _load_digits()
    if source in TFDS_DATASETS:
        return _load_tfds(source, data_dir=data_dir, download=download)
    path = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(path):
        return _load_image_archive(path, cache_dir=cache_dir)
    if _looks_like_path(source):
        raise FileNotFoundError(f"data source path not found: {source!r} (resolved to {path})")
    if _is_tfds_builder(source):
        return _load_tfds(source, data_dir=data_dir, download=download)
    known = ", ".join([_DIGITS, *TFDS_DATASETS])
    raise ValueError(
        f"unknown data set {source!r}; known: {known}; or another registered tensorflow-datasets "
        "builder with image and label features; or a path to an image folder or .zip"
    )


def _looks_like_path(source: str) -> bool:
    return (
        "/" in source
        or os.sep in source
        or source.startswith((".", "~"))
        or source.lower().endswith(".zip")
    )


# --------------------------------------------------------------------------------------------
# Channel statistics.


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of ``images / 255`` from 256-bin histograms (low memory)."""
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for channel in range(images.shape[-1]):
        counts = np.bincount(images[..., channel].reshape(-1), minlength=256)
        total = counts.sum()
        if total == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        mean = float(counts @ values) / total
        variance = max(float(counts @ values**2) / total - mean**2, 0.0)
        means.append(mean / 255.0)
        stds.append(math.sqrt(variance) / 255.0)
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------
# 1. scikit-learn digits.


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] with values 0..16, labels): the digits.csv.gz that scikit-learn ships,
    read directly, as `sklearn.datasets.load_digits` reads it (importing sklearn.datasets takes
    about 2 s, longer than a short run on digits); that loader where the file is not found."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # noqa: PLC0415

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits() -> Dataset:
    """The 8x8 digits, split per class: the last ceil(20%) of each class (dataset order) is test."""
    pixels, targets = _digits_arrays()
    # Pixel values are integers 0..16; scale to 0..255.
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
    labels = targets.astype(np.int32)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        (indices,) = np.nonzero(labels == label)
        num_test = math.ceil(_DIGITS_TEST_FRACTION * len(indices))
        is_test[indices[len(indices) - num_test :]] = True
    train_images = images[~is_test]
    mean, std = _channel_stats(train_images)
    return Dataset(
        name=_DIGITS,
        train_images=train_images,
        train_labels=labels[~is_test],
        test_images=images[is_test],
        test_labels=labels[is_test],
        class_names=tuple(str(n) for n in range(10)),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# 2. tensorflow-datasets.


def _is_tfds_builder(name: str) -> bool:
    """Whether `name` is a registered tensorflow-datasets builder (False when tfds is missing)."""
    if not _TFDS_BUILDER_NAME.fullmatch(name):
        return False
    try:
        import tensorflow_datasets as tfds  # Deferred: heavy, and only needed here.

        tfds.builder_cls(name)
    except Exception:  # DatasetNotFoundError, ImportError, a builder module that fails to import.
        return False
    return True


def _prepare_hint(name: str) -> str:
    """How to prepare `name` elsewhere and point load_dataset at it (one line)."""
    return (
        f"to prepare it, on a machine with network access run `pip install tensorflow "
        f"tensorflow-datasets` and `tfds build {name} --file_format=array_record --data_dir=DIR` "
        f"(or in Python: tfds.builder({name!r}, data_dir=DIR, file_format='array_record')"
        f".download_and_prepare()), copy DIR here and pass it as data_dir=DIR "
        f"(Python: load_dataset({name!r}, data_dir=DIR); scripts: --config.data_dir=DIR)"
    )


def _first_line(error: BaseException, limit: int = 200) -> str:
    reason = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def _innermost_cause(error: BaseException) -> BaseException:
    """The root of a requests/urllib3 error chain (NameResolutionError, not ConnectionError)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "reason", None)  # urllib3's MaxRetryError.
        if not isinstance(inner, BaseException):
            inner = getattr(error, "original_error", None)  # urllib3's ProxyError.
        if not isinstance(inner, BaseException):
            inner = next((a for a in error.args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        error = inner
    return error


def _probe_urls(urls: Iterable[str], timeout: float) -> str | None:
    """Checks that the http(s) hosts of `urls` answer, within `timeout` seconds in all.

    One HEAD request per host, in parallel daemon threads (a hanging DNS lookup or connect cannot
    hold the caller past `timeout`), no retries; any HTTP status counts as an answer. Proxies are
    taken from the environment, as tfds's downloader (requests) takes them.

    Returns:
      None when every host answered, else one line naming those that did not and why.
    """
    import requests  # Deferred: a tfds dependency, only needed here.

    targets: dict[str, str] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in ("http", "https") and parts.netloc:
            targets.setdefault(parts.netloc, url)
    results: dict[str, str] = {}  # host -> "" (answered) or why not; absent: no answer in time.

    def probe(host: str, url: str) -> None:
        try:
            requests.head(url, timeout=timeout, allow_redirects=False).close()
        except Exception as error:  # requests.RequestException, ssl, socket errors.
            results[host] = _first_line(_innermost_cause(error), limit=160)
        else:
            results[host] = ""

    threads = [
        threading.Thread(target=probe, args=item, name=f"probe {item[0]}", daemon=True)
        for item in targets.items()
    ]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    problems = [
        f"{host}: {results.get(host, f'no answer within {timeout:g} s')}"
        for host in targets
        if results.get(host) != ""
    ]
    return "; ".join(problems) or None


def _preflight_download(builder: Any, name: str) -> None:
    """Raises DataSourceError, quickly, where downloading and preparing `name` cannot work here.

    Checks that the hosts of the builder's registered download URLs (its checksums file; every
    builder of TFDS_DATASETS has one) answer within ``_DOWNLOAD_PROBE_TIMEOUT_S`` seconds (tfds's
    own downloader retries a failed connection ten times with backoff, about 205 s), then, for the
    builders of TFDS_DATASETS, that TensorFlow is installed (they encode images with it).
    """
    where = f"{name!r} is not prepared in {builder.data_dir} (array_record)"
    try:
        urls = sorted(type(builder).url_infos or ())
    except Exception:  # No or an unreadable checksums file: nothing to check beforehand.
        urls = []
    if urls:
        offline = _probe_urls(urls, _DOWNLOAD_PROBE_TIMEOUT_S)
        if offline is not None:
            raise DataSourceError(
                f"tensorflow-datasets data set {where} and cannot be downloaded here (no answer "
                f"from its download host: {offline}); {_prepare_hint(name)}"
            )
    if name in TFDS_DATASETS and importlib.util.find_spec("tensorflow") is None:
        raise DataSourceError(
            f"tensorflow-datasets data set {where}, and tfds needs TensorFlow (not installed "
            f"here) to prepare it; {_prepare_hint(name)}"
        )


def _load_tfds(name: str, *, data_dir: str | None, download: bool) -> Dataset:
    """Reads both splits of a tfds data set through its builder's ``as_data_source``.

    Prepared data are read without any network access; data that are not prepared are
    downloaded and prepared (when `download`) only after :func:`_preflight_download`.
    """
    splits = TFDS_DATASETS.get(name, _TfdsSplits("train", "test"))
    if data_dir is not None:
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
    try:
        import tensorflow_datasets as tfds  # Deferred: heavy, and only needed here.

        # Random access needs array_record; tfds only defaults to it when data_dir is None.
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        features = builder.info.features
        label = features["label"] if "label" in features else None
    except Exception as error:  # tfds raises many types (KeyError, ImportError, OSError, ...).
        raise DataSourceError(
            f"tensorflow-datasets cannot make a builder for {name!r} (data_dir={data_dir!r}; "
            f"{_first_line(error)}); {_prepare_hint(name)}"
        ) from error
    if "image" not in features or not hasattr(label, "names"):
        raise DataSourceError(
            f"tensorflow-datasets data set {name!r} has no 'image' and 'label' (ClassLabel) "
            f"features (it has {sorted(features.keys())}); only image classification data sets "
            "can be loaded"
        )
    if not builder.is_prepared():
        if not download:
            raise DataSourceError(
                f"tensorflow-datasets data set {name!r} is not prepared in {builder.data_dir} "
                f"(array_record) and download=False; {_prepare_hint(name)}"
            )
        _preflight_download(builder, name)
        try:
            builder.download_and_prepare()
        except Exception as error:
            raise DataSourceError(
                f"tensorflow-datasets could not download and prepare {name!r} in "
                f"{builder.data_dir} ({_first_line(error)}); {_prepare_hint(name)}"
            ) from error
    try:
        train_source, test_source = builder.as_data_source(split=[splits.train, splits.test])
        train_images, train_labels = _read_tfds_split(train_source)
        test_images, test_labels = _read_tfds_split(test_source)
        class_names = tuple(train_source.dataset_info.features["label"].names)
    except Exception as error:
        raise DataSourceError(
            f"tensorflow-datasets could not read {name!r} splits {splits.train!r} and "
            f"{splits.test!r} from {builder.data_dir} ({_first_line(error)}); "
            f"{_prepare_hint(name)}"
        ) from error
    decoded = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    return _make_image_dataset(name, class_names, decoded, stats_name=name)


def _read_tfds_split(source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of one tfds data source into ``(images [N,H,W,C], labels [N])``."""
    num_records = len(source)
    first = source[0]
    images = np.empty((num_records, *np.shape(first["image"])), dtype=np.uint8)
    labels = np.empty((num_records,), dtype=np.int32)
    read_batch = _batched_reader(source)
    for start in range(0, num_records, _TFDS_READ_BATCH):
        keys = list(range(start, min(start + _TFDS_READ_BATCH, num_records)))
        for index, record in zip(keys, read_batch(keys), strict=True):
            images[index] = record["image"]
            labels[index] = record["label"]
    return images, labels


def _batched_reader(source: Any) -> Callable[[Sequence[int]], Sequence[Any]]:
    """Returns a batch reader: ``__getitems__`` (parallel reads) where it works, else a loop.

    ``tfds.testing.mock_data`` installs ``__getitems__`` on a MagicMock as a plain attribute, so
    calling it through the data source fails with a TypeError (tfds 4.9.10); fall back to reading
    one record at a time there.
    """
    try:
        source.__getitems__([0])
    except TypeError:
        _logger.debug("tfds source %r has no working __getitems__; reading one by one", source)
        return lambda keys: [source[key] for key in keys]
    return source.__getitems__


# --------------------------------------------------------------------------------------------
# 3. Image folders and zip archives.


class _ImageFile(NamedTuple):
    split: str
    class_name: str
    file_name: str
    member: str  # Path relative to the folder, or the zip member name.


def _cache_key(path: str) -> str:
    """Hashes the source's identity and version: path, size and mtime (every file, for folders)."""
    digest = hashlib.sha256(f"v{_CACHE_FORMAT_VERSION}|{path}".encode())
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for file_name in sorted(files):
                file_path = os.path.join(root, file_name)
                stat = os.stat(file_path)
                relative = os.path.relpath(file_path, path)
                digest.update(f"|{relative}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        stat = os.stat(path)
        digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _cache_path(path: str, cache_dir: str | None) -> str:
    stem = os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0] or "data"
    return os.path.join(resolve_cache_dir(cache_dir), f"{stem}-{_cache_key(path)}.npz")


def _dataset_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]


def _load_image_archive(path: str, *, cache_dir: str | None) -> Dataset:
    """Loads a folder or zip source, from the decoded-array cache when it is valid."""
    if not os.path.isdir(path) and not zipfile.is_zipfile(path):
        raise DataSourceError(f"not an image folder or a valid zip archive (corrupt?): {path}")
    cache_file = _cache_path(path, cache_dir)
    name = _dataset_name(path)
    _remove_orphaned_temp_files(cache_file)
    if os.path.exists(cache_file):
        dataset = _read_cache(cache_file, name)
        if dataset is not None:
            _logger.info("Loaded %s from cache %s", path, cache_file)
            return dataset
    _logger.info("Decoding images of %s (cached afterwards in %s)", path, cache_file)
    if os.path.isdir(path):
        dataset = _decode_folder(path, name)
    else:
        dataset = _decode_zip(path, name)
    _write_cache(cache_file, dataset)
    return dataset


def _read_cache(cache_file: str, name: str) -> Dataset | None:
    """Reads a cache file; deletes it and returns None (with a warning) if it is unusable."""
    try:
        # Open the file ourselves: np.load leaks its handle when the zip directory is unreadable.
        with open(cache_file, "rb") as file, np.load(file, allow_pickle=False) as contents:
            missing = set(_CACHE_KEYS) - set(contents.files)
            if missing:
                raise KeyError(f"missing keys {sorted(missing)}")
            arrays = {key: contents[key] for key in _CACHE_KEYS}
        return Dataset(
            name=name,
            train_images=arrays["train_images"],
            train_labels=arrays["train_labels"],
            test_images=arrays["test_images"],
            test_labels=arrays["test_labels"],
            class_names=tuple(arrays["class_names"].tolist()),
            mean=tuple(arrays["mean"].tolist()),
            std=tuple(arrays["std"].tolist()),
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(
            f"unreadable data cache {cache_file} ({type(error).__name__}: {error}); "
            "deleting it and decoding the source again",
            stacklevel=4,
        )
        try:
            os.remove(cache_file)
        except OSError:
            pass
        return None


def _lock_exclusive(descriptor: int, blocking: bool) -> bool:
    """flock(LOCK_EX) on `descriptor`; False if another holds it (non-blocking) or no flock."""
    try:
        import fcntl  # Not on Windows: there, temp files are judged by age alone.
    except ImportError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # A file system without flock: judged by age alone.
        return True
    return True


def _remove_orphaned_temp_files(cache_file: str) -> None:
    """Deletes temp files of killed cache writes for this cache file's stem.

    A writer holds an exclusive flock on its temp file while writing (see :func:`_write_cache`),
    and the lock dies with the process; a temp file older than ``_ORPHAN_TEMP_AGE_S`` seconds that
    nobody holds locked is an orphan. Any ``<stem>-<key>.npz.*.tmp`` qualifies, so caches of an
    earlier version of the same source are cleaned too.
    """
    directory, base = os.path.split(cache_file)
    stem = base.rsplit("-", 1)[0]
    pattern = f"{glob.escape(stem)}-{'[0-9a-f]' * 16}.npz.*.tmp"
    now = time.time()
    for temp_path in glob.glob(os.path.join(glob.escape(directory), pattern)):
        try:
            if now - os.stat(temp_path).st_mtime < _ORPHAN_TEMP_AGE_S:
                continue
            with open(temp_path, "rb") as file:
                live = not _lock_exclusive(file.fileno(), blocking=False)
            if live:  # A writer holds it.
                continue
            os.remove(temp_path)
            _logger.info("Removed %s, left by a cache write that did not finish", temp_path)
        except OSError:  # Gone meanwhile, or not ours to remove: harmless.
            continue


def _write_cache(cache_file: str, dataset: Dataset) -> None:
    """Writes the cache atomically (temp file + rename); a failure only costs a warning.

    The temp file is flock-ed while written, so that :func:`_remove_orphaned_temp_files` (run by
    other loads) leaves it alone.
    """
    directory = os.path.dirname(cache_file)
    temp_path = None
    try:
        os.makedirs(directory, exist_ok=True)
        descriptor, temp_path = tempfile.mkstemp(
            dir=directory, prefix=os.path.basename(cache_file) + ".", suffix=".tmp"
        )
        _lock_exclusive(descriptor, blocking=True)  # Released when the file is closed.
        with os.fdopen(descriptor, "wb") as file:
            np.savez(
                file,
                train_images=dataset.train_images,
                train_labels=dataset.train_labels,
                test_images=dataset.test_images,
                test_labels=dataset.test_labels,
                class_names=np.asarray(dataset.class_names, dtype=np.str_),
                mean=np.asarray(dataset.mean, dtype=np.float64),
                std=np.asarray(dataset.std, dtype=np.float64),
            )
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, cache_file)
        temp_path = None
    except OSError as error:
        warnings.warn(f"could not write data cache {cache_file}: {error}", stacklevel=4)
    finally:
        if temp_path is not None and os.path.exists(temp_path):
            os.remove(temp_path)


def _is_ignored(parts: Sequence[str]) -> bool:
    """Hidden files/folders and macOS resource forks are not data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


_SKIP_HIDDEN = "hidden or macOS metadata"
_SKIP_DEPTH = "not at [top/]split/class/file"
_SKIP_EXTENSION = "not .jpg/.jpeg/.png"
_SKIP_SPLIT = "split folder neither train nor test"


def _index_images(relative_paths: Iterable[str]) -> tuple[list[_ImageFile], dict[str, list[str]]]:
    """Parses ``[top/]split/class/file.ext`` paths into image entries.

    Returns:
      The entries (those of splits other than train/test too, for error messages; they are not
      decoded) and the files not taken, by reason (see :func:`_warn_skipped`).
    """
    skipped: dict[str, list[str]] = {}
    paths = []
    for path in relative_paths:
        if _is_ignored(path.split("/")):
            skipped.setdefault(_SKIP_HIDDEN, []).append(path)
        else:
            paths.append(path)
    split_parts = [p.split("/") for p in paths]
    top_levels = {parts[0] for parts in split_parts if len(parts) > 1}
    strip_top = len(top_levels) == 1 and not top_levels & set(_REQUIRED_SPLITS)
    entries = []
    for member, parts in zip(paths, split_parts, strict=True):
        if strip_top:
            parts = parts[1:]
        if len(parts) != 3:
            skipped.setdefault(_SKIP_DEPTH, []).append(member)
        elif not parts[2].lower().endswith(_IMAGE_EXTENSIONS):
            skipped.setdefault(_SKIP_EXTENSION, []).append(member)
        else:
            if parts[0] not in _REQUIRED_SPLITS:
                skipped.setdefault(_SKIP_SPLIT, []).append(member)
            entries.append(_ImageFile(parts[0], parts[1], parts[2], member))
    return entries, skipped


def _warn_skipped(skipped: dict[str, list[str]], source: str) -> None:
    """One UserWarning naming the files not taken from `source`, grouped by reason."""
    if not skipped:
        return
    groups = []
    for reason, members in skipped.items():
        shown = ", ".join(sorted(members)[:_SKIPPED_NAMES_SHOWN])
        more = len(members) - _SKIPPED_NAMES_SHOWN
        groups.append(f"{reason}: {shown}" + (f" (and {more} more)" if more > 0 else ""))
    total = sum(len(members) for members in skipped.values())
    warnings.warn(
        f"skipped {total} file{'s' if total != 1 else ''} of {source}: " + "; ".join(groups),
        stacklevel=5,  # The caller of load_dataset.
    )


def _check_layout(entries: Sequence[_ImageFile], source: str) -> tuple[str, ...]:
    """Checks that train and test exist with the same classes; returns the sorted class names."""
    classes = {
        split: {e.class_name for e in entries if e.split == split} for split in _REQUIRED_SPLITS
    }
    found = sorted({e.split for e in entries})
    for split in _REQUIRED_SPLITS:
        if not classes[split]:
            raise DataSourceError(
                f"{source}: no images under split {split!r} (found splits {found}); expected "
                "[top/]train/<class>/<image> and [top/]test/<class>/<image> (jpg, jpeg or png)"
            )
    if classes["train"] != classes["test"]:
        only_train = sorted(classes["train"] - classes["test"])
        only_test = sorted(classes["test"] - classes["train"])
        raise DataSourceError(
            f"{source}: class folders differ between train and test "
            f"(only in train: {only_train}; only in test: {only_test})"
        )
    return tuple(sorted(classes["train"]))


def _is_wide_gray(mode: str) -> bool:
    """16-bit (``I;16``, ``I;16B``, ...) or 32-bit integer grayscale: scaled, not clipped."""
    return mode == "I" or mode.startswith("I;16")


def _target_mode(mode: str) -> str:
    """Grayscale images decode to one channel; everything else to RGB."""
    return "L" if mode in ("1", "L", "LA", "La", "F") or _is_wide_gray(mode) else "RGB"


def _too_large(name: str, size: str) -> str:
    return (
        f"image {name} is {size}, over the limit of {_MAX_IMAGE_PIXELS:,} pixels "
        "(a decompression bomb?): refused before decoding"
    )


def _pixels_uint8(image: Any, target: str) -> np.ndarray:
    """The image's pixels as uint8 ``[H, W]`` (L) or ``[H, W, 3]`` (RGB)."""
    if _is_wide_gray(image.mode):
        # 16-bit: round(value * 255 / 65535); Pillow's convert("L") would clip at 255.
        wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        pixels = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(pixels[..., None], 3, axis=-1) if target == "RGB" else pixels
    if image.mode != target:
        image = image.convert(target)
    return np.asarray(image, dtype=np.uint8)


def _decode_image(data: bytes, name: str, mode: str | None) -> np.ndarray:
    """Decodes one image file to uint8 ``[H, W, C]``, converted to ``mode`` (or its own mode).

    16-bit grayscale is scaled to 8 bits (``round(value * 255 / 65535)``); an image of more than
    ``_MAX_IMAGE_PIXELS`` pixels is refused from its header, before decoding.

    Args:
      data: The encoded file.
      name: Where it came from, for error messages (e.g. ``archive.zip:train/cat/x.png``).
      mode: ``"L"`` or ``"RGB"`` to convert to; None picks it from this image (see
        ``_target_mode``).

    Returns:
      The uint8 pixel array.

    Raises:
      DataSourceError: The image is too large, or Pillow cannot decode the file (one line).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns from 89M pixels (and raises from twice that): ours is the lower limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # Reads the header only.
        with image:
            width, height = image.size
            if width * height > _MAX_IMAGE_PIXELS:
                raise DataSourceError(_too_large(name, f"{width}x{height} pixels"))
            pixels = _pixels_uint8(image, mode or _target_mode(image.mode))
    except DataSourceError:
        raise
    except Image.DecompressionBombError as error:  # Raised by Image.open, from the header.
        raise DataSourceError(_too_large(name, f"too large ({error})")) from error
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataSourceError(f"cannot decode image {name}: {error}") from error
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _decode_entries(
    entries: Sequence[_ImageFile],
    class_names: tuple[str, ...],
    read_fn: Callable[[_ImageFile], bytes],
    source: str,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decodes all images into per-split ``(images, labels)``; class-major, file-name order.

    Each image decodes in its own mode (L or RGB); the data set is RGB if any image is, and its
    grayscale images are then replicated to three channels (as Pillow's L -> RGB conversion).
    """
    label_of = {name: label for label, name in enumerate(class_names)}
    first_shape: tuple[int, ...] | None = None
    channels = 1  # 3 from the first colour image on.
    result = {}
    for split in _REQUIRED_SPLITS:
        split_entries = sorted(
            (e for e in entries if e.split == split),
            key=lambda e: (label_of[e.class_name], e.file_name),
        )
        images: np.ndarray | None = None
        labels = np.empty((len(split_entries),), dtype=np.int32)
        for index, entry in enumerate(split_entries):
            where = f"{source}:{entry.member}"
            pixels = _decode_image(read_fn(entry), where, None)
            if first_shape is None:
                first_shape = pixels.shape
            elif pixels.shape[:2] != first_shape[:2]:
                raise DataSourceError(
                    f"image {where} has shape {pixels.shape}, but earlier images have "
                    f"{first_shape}; all images must share one size"
                )
            if pixels.shape[-1] > channels:
                channels = pixels.shape[-1]
                if images is not None:  # The images so far were all grayscale.
                    images = np.repeat(images, channels, axis=-1)
            if images is None:
                images = np.empty((len(split_entries), *pixels.shape[:2], channels), np.uint8)
            images[index] = pixels  # Broadcasts a grayscale image to RGB.
            labels[index] = label_of[entry.class_name]
        result[split] = (images, labels)
    for split, (images, labels) in result.items():
        if images.shape[-1] != channels:  # A split decoded before the first colour image.
            result[split] = (np.repeat(images, channels, axis=-1), labels)
    return result


def _make_image_dataset(
    name: str,
    class_names: tuple[str, ...],
    decoded: dict[str, tuple[np.ndarray, np.ndarray]],
    stats_name: str | None = None,
) -> Dataset:
    """A Dataset with the known per-channel statistics of `stats_name` (or of CIFAR-10 for its
    class names), else those computed from the train images."""
    train_images, train_labels = decoded["train"]
    test_images, test_labels = decoded["test"]
    if stats_name in DATASET_STATS:
        mean, std = DATASET_STATS[stats_name]
    elif class_names == CIFAR10_CLASS_NAMES and train_images.shape[-1] == 3:
        mean, std = DATASET_STATS["cifar10"]
    else:
        mean, std = _channel_stats(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        mean=mean,
        std=std,
    )


def _decode_folder(path: str, name: str) -> Dataset:
    relative_paths = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for file_name in files:
            relative = os.path.relpath(os.path.join(root, file_name), path)
            relative_paths.append(relative.replace(os.sep, "/"))
    entries, skipped = _index_images(relative_paths)
    class_names = _check_layout(entries, path)
    _warn_skipped(skipped, path)

    def read_fn(entry: _ImageFile) -> bytes:
        with open(os.path.join(path, entry.member), "rb") as file:
            return file.read()

    decoded = _decode_entries(entries, class_names, read_fn, path)
    return _make_image_dataset(name, class_names, decoded)


def _decode_zip(path: str, name: str) -> Dataset:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
            entries, skipped = _index_images(members)
            class_names = _check_layout(entries, path)
            _warn_skipped(skipped, path)
            decoded = _decode_entries(
                entries, class_names, lambda entry: archive.read(entry.member), path
            )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as error:
        raise DataSourceError(f"corrupt zip archive {path}: {error}") from error
    return _make_image_dataset(name, class_names, decoded)


def _first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    return np.sort(
        np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in np.unique(labels)])
    )


def subset_per_class(
    dataset: Dataset, train_per_class: int = 0, test_per_class: int = 0
) -> Dataset:
    """The first `n` images of every class (in data set order) of the train and/or test arrays;
    0 keeps a split whole. For CPU-sized experiments on large data sets. The name records the
    subset, so splits made on it are refused for the full data set and vice versa."""
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError("per-class subset sizes must be >= 0")
    if not train_per_class and not test_per_class:
        return dataset
    train = (
        _first_per_class(dataset.train_labels, train_per_class)
        if train_per_class
        else np.arange(len(dataset.train_labels))
    )
    test = (
        _first_per_class(dataset.test_labels, test_per_class)
        if test_per_class
        else np.arange(len(dataset.test_labels))
    )
    return dataclasses.replace(
        dataset,
        name=f"{dataset.name}[train {train_per_class or 'all'}/class, test "
        f"{test_per_class or 'all'}/class]",
        train_images=dataset.train_images[train],
        train_labels=dataset.train_labels[train],
        test_images=dataset.test_images[test],
        test_labels=dataset.test_labels[test],
    )
