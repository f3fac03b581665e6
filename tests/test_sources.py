"""Tests for salun_jax.data.sources: digits, image folders/zips (+ cache), tfds (mocked), errors.

tests/test_tfds_local.py builds a real tfds data set and loads it; unprepared data are there.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import pathlib
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from salun_jax.data import sources
from salun_jax.data.sources import Dataset, DataSourceError, load_dataset

_CLASSES = ("cat", "dog", "emu")  # Deliberately written to disk out of order below.
_NUM_PER_SPLIT = {"train": 4, "test": 2}
_IMAGE_SHAPE = (4, 5, 3)
_SHARED_CIFAR_ZIP = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cifar10_jpeg.zip"


def _expected_pixels(split: str, label: int, index: int) -> np.ndarray:
    rng = np.random.default_rng([_NUM_PER_SPLIT[split], label, index])
    return rng.integers(0, 256, size=_IMAGE_SHAPE, dtype=np.uint8)


def _write_tree(root: pathlib.Path) -> None:
    """Writes split/class/NN.png under root (classes in reverse order, files unsorted)."""
    for split, count in _NUM_PER_SPLIT.items():
        for label in reversed(range(len(_CLASSES))):
            class_dir = root / split / _CLASSES[label]
            class_dir.mkdir(parents=True)
            for index in reversed(range(count)):
                pixels = _expected_pixels(split, label, index)
                Image.fromarray(pixels).save(class_dir / f"{index:02d}.png")


def _write_zip(zip_path: pathlib.Path, tree_root: pathlib.Path, top: str | None) -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(tree_root.rglob("*"), reverse=True):
            relative = file.relative_to(tree_root).as_posix()
            archive.write(file, f"{top}/{relative}" if top else relative)


@pytest.fixture
def image_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "tiny"
    _write_tree(root)
    return root


@pytest.fixture
def image_zip(tmp_path: pathlib.Path, image_folder: pathlib.Path) -> pathlib.Path:
    zip_path = tmp_path / "tiny_archive.zip"
    _write_zip(zip_path, image_folder, top="tiny_top")
    return zip_path


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache"


def _cache_files(cache_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(cache_dir.glob("*.npz"))


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_and_stats():
    data = load_dataset("digits")
    assert data.name == "digits"
    assert data.train_images.dtype == np.uint8 and data.test_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int32 and data.test_labels.dtype == np.int32
    assert data.image_shape == (8, 8, 1)
    assert data.num_classes == 10
    assert data.class_names == tuple(str(i) for i in range(10))
    assert len(data.train_images) + len(data.test_images) == 1797
    assert data.train_images.max() == 255 and data.train_images.min() == 0
    assert len(data.mean) == len(data.std) == 1
    assert 0.1 < data.mean[0] < 0.5 and 0.2 < data.std[0] < 0.5
    np.testing.assert_allclose(data.mean[0], data.train_images.mean() / 255, rtol=1e-9)
    np.testing.assert_allclose(data.std[0], (data.train_images / 255).std(), rtol=1e-9)


def test_digits_split_is_deterministic_and_stratified():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.fingerprint() == load_dataset("digits").fingerprint()
    bunch = load_digits()
    labels = bunch.target
    expected_test = np.concatenate(
        [np.nonzero(labels == c)[0][-math.ceil(0.2 * (labels == c).sum()) :] for c in range(10)]
    )
    expected_test.sort()
    expected_train = np.setdiff1d(np.arange(len(labels)), expected_test)
    np.testing.assert_array_equal(data.test_labels, labels[expected_test])
    np.testing.assert_array_equal(data.train_labels, labels[expected_train])
    np.testing.assert_array_equal(
        data.test_images[..., 0], np.rint(bunch.images[expected_test] * 255 / 16)
    )
    for c in range(10):
        fraction = (data.test_labels == c).sum() / (labels == c).sum()
        assert 0.2 <= fraction < 0.21


def test_digits_read_without_sklearn_match_its_loader(monkeypatch):
    from sklearn.datasets import load_digits

    from salun_jax.data import sources

    bunch = load_digits()
    images, labels = sources._digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    assert tuple(str(n) for n in bunch.target_names) == load_dataset("digits").class_names
    # Where the file is not where sklearn keeps it, sklearn's loader gives the same data.
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    images, labels = sources._digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


# --------------------------------------------------------------------------------------------
# Dataset


def test_dataset_fingerprint_readonly_and_validation():
    images = np.zeros((6, 2, 2, 1), np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1], np.int32)
    make = lambda train_labels: Dataset(
        "toy", images, train_labels, images[:2], labels[:2], ("a", "b"), (0.0,), (1.0,)
    )
    data = make(labels)
    assert len(data.fingerprint()) == 16
    assert data.fingerprint() == make(labels.copy()).fingerprint()
    assert data.fingerprint() != make(labels[::-1].copy()).fingerprint()
    with pytest.raises(ValueError, match="read-only"):
        data.train_labels[0] = 1
    with pytest.raises(ValueError, match="int32"):
        make(labels.astype(np.int64))
    with pytest.raises(ValueError, match="outside"):
        make(labels + 1)


# --------------------------------------------------------------------------------------------
# Image folders and zip archives


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_image_source_labels_and_pixels(kind, image_folder, image_zip, cache_dir):
    source = image_folder if kind == "folder" else image_zip
    data = load_dataset(str(source), cache_dir=str(cache_dir))
    assert data.name == ("tiny" if kind == "folder" else "tiny_archive")
    assert data.class_names == _CLASSES
    assert data.image_shape == _IMAGE_SHAPE
    for split, count in _NUM_PER_SPLIT.items():
        images = getattr(data, f"{split}_images")
        labels = getattr(data, f"{split}_labels")
        # Class-major, then sorted by file name.
        np.testing.assert_array_equal(labels, np.repeat(np.arange(3, dtype=np.int32), count))
        expected = [_expected_pixels(split, c, i) for c in range(3) for i in range(count)]
        np.testing.assert_array_equal(images, np.stack(expected))
    np.testing.assert_allclose(data.mean, (data.train_images / 255).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(data.std, (data.train_images / 255).std(axis=(0, 1, 2)))
    assert len(_cache_files(cache_dir)) == 1


def test_folder_and_zip_give_same_content(image_folder, tmp_path, cache_dir):
    zip_path = tmp_path / "tiny.zip"  # Same stem, no top-level folder.
    _write_zip(zip_path, image_folder, top=None)
    folder_data = load_dataset(str(image_folder), cache_dir=str(cache_dir))
    zip_data = load_dataset(str(zip_path), cache_dir=str(cache_dir))
    assert folder_data.fingerprint() == zip_data.fingerprint()
    assert len(_cache_files(cache_dir)) == 2  # Keyed by path: no clash despite the same stem.


def test_cache_is_reused_without_decoding(image_zip, cache_dir, monkeypatch):
    first = load_dataset(str(image_zip), cache_dir=str(cache_dir))
    (cache_file,) = _cache_files(cache_dir)

    def fail(*args, **kwargs):
        raise AssertionError("decoded despite a valid cache")

    monkeypatch.setattr(sources, "_decode_image", fail)
    second = load_dataset(str(image_zip), cache_dir=str(cache_dir))
    assert second.fingerprint() == first.fingerprint()
    assert second.class_names == first.class_names and second.mean == first.mean
    assert _cache_files(cache_dir) == [cache_file]
    assert not list(cache_dir.glob("*.tmp"))


def test_cache_dir_from_environment(image_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("SALUN_JAX_CACHE", str(tmp_path / "env_cache"))
    load_dataset(str(image_zip))
    assert len(_cache_files(tmp_path / "env_cache")) == 1


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _drop_key(path: pathlib.Path) -> None:
    with np.load(path) as contents:
        arrays = {k: contents[k] for k in contents.files if k != "test_labels"}
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "corrupt",
    [lambda p: p.write_bytes(b"garbage" * 10), _truncate, _drop_key],
    ids=["garbage", "truncated", "missing_key"],
)
def test_corrupt_cache_is_rebuilt_with_warning(corrupt, image_zip, cache_dir):
    first = load_dataset(str(image_zip), cache_dir=str(cache_dir))
    (cache_file,) = _cache_files(cache_dir)
    corrupt(cache_file)
    with pytest.warns(UserWarning, match="unreadable data cache"):
        rebuilt = load_dataset(str(image_zip), cache_dir=str(cache_dir))
    assert rebuilt.fingerprint() == first.fingerprint()
    assert _cache_files(cache_dir) == [cache_file]
    assert load_dataset(str(image_zip), cache_dir=str(cache_dir)).fingerprint() == (
        first.fingerprint()
    )


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_changed_source_gets_a_new_cache_key(change, image_zip, cache_dir):
    load_dataset(str(image_zip), cache_dir=str(cache_dir))
    if change == "mtime":
        stat = image_zip.stat()
        os.utime(image_zip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        with zipfile.ZipFile(image_zip, "a") as archive:
            archive.writestr("tiny_top/README.txt", "not an image; ignored")
    skips_readme = pytest.warns(UserWarning, match=r"not at \[top/\]split/class/file: .*README")
    with skips_readme if change == "size" else contextlib.nullcontext():
        load_dataset(str(image_zip), cache_dir=str(cache_dir))
    assert len(_cache_files(cache_dir)) == 2


def test_changed_folder_file_gets_a_new_cache_key(image_folder, cache_dir):
    load_dataset(str(image_folder), cache_dir=str(cache_dir))
    pixels = np.full(_IMAGE_SHAPE, 7, np.uint8)
    Image.fromarray(pixels).save(image_folder / "train" / "cat" / "00.png")
    data = load_dataset(str(image_folder), cache_dir=str(cache_dir))
    np.testing.assert_array_equal(data.train_images[0], pixels)
    assert len(_cache_files(cache_dir)) == 2


def test_grayscale_images_keep_one_channel(tmp_path, cache_dir):
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "gray" / split / name).mkdir(parents=True)
            Image.new("L", (3, 2), color=200).save(tmp_path / "gray" / split / name / "x.png")
    data = load_dataset(str(tmp_path / "gray"), cache_dir=str(cache_dir))
    assert data.image_shape == (2, 3, 1)
    assert (data.train_images == 200).all()


def _two_class_folder(root: pathlib.Path, images: dict[str, Image.Image]) -> pathlib.Path:
    """train/{a,b}/<name>.png and test/{a,b}/<name>.png, every class holding `images`."""
    for split in ("train", "test"):
        for class_name in ("a", "b"):
            (root / split / class_name).mkdir(parents=True)
            for name, image in images.items():
                image.save(root / split / class_name / f"{name}.png")
    return root


def test_mixed_grayscale_and_rgb_become_rgb(tmp_path, cache_dir):
    # The grayscale image sorts first in every class; one colour image makes the data set RGB.
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    colour = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    root = _two_class_folder(
        tmp_path / "mixed", {"0_gray": Image.fromarray(gray), "1_rgb": Image.fromarray(colour)}
    )
    data = load_dataset(str(root), cache_dir=str(cache_dir))
    assert data.image_shape == (2, 3, 3)
    for images in (data.train_images, data.test_images):
        np.testing.assert_array_equal(images[0::2], np.broadcast_to(gray[..., None], (2, 2, 3, 3)))
        np.testing.assert_array_equal(images[1::2], np.broadcast_to(colour, (2, 2, 3, 3)))


def test_mixed_folder_with_colour_only_in_test_becomes_rgb(tmp_path, cache_dir):
    gray = Image.new("L", (3, 2), color=90)
    colour = Image.new("RGB", (3, 2), color=(1, 2, 3))
    root = _two_class_folder(tmp_path / "late", {"x": gray})
    colour.save(root / "test" / "b" / "y.png")
    data = load_dataset(str(root), cache_dir=str(cache_dir))
    assert data.image_shape == (2, 3, 3)
    assert (data.train_images == 90).all()  # Decoded before the colour image: made RGB after.
    np.testing.assert_array_equal(data.test_images[-1], np.broadcast_to([1, 2, 3], (2, 3, 3)))


def test_16_bit_png_is_scaled_not_clipped(tmp_path, cache_dir):
    values = np.array([[0, 1, 128, 255, 256, 257], [1000, 32767, 32768, 65279, 65534, 65535]])
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode == "I;16"
    root = _two_class_folder(tmp_path / "deep", {"x": image})
    with Image.open(root / "train" / "a" / "x.png") as reread:
        assert reread.mode == "I;16"  # A real 16-bit grayscale PNG.
    data = load_dataset(str(root), cache_dir=str(cache_dir))
    expected = np.round(values * 255 / 65535).astype(np.uint8)  # Documented: rounded.
    assert data.image_shape == (2, 6, 1)
    np.testing.assert_array_equal(data.train_images[0, ..., 0], expected)
    assert len(np.unique(data.train_images)) > 2  # Not binarised to {0, 255}.
    # 8-bit data stored as value * 257 (the usual widening) comes back exactly.
    eight = np.arange(256, dtype=np.uint16).reshape(16, 16)
    root = _two_class_folder(tmp_path / "widened", {"x": Image.fromarray(eight * 257)})
    data = load_dataset(str(root), cache_dir=str(cache_dir))
    np.testing.assert_array_equal(data.test_images[1, ..., 0], eight)


def test_skipped_files_named_with_reason(image_folder, tmp_path, cache_dir):
    extra = {
        "train/cat/notes.txt": b"not an image",
        "train/dog/anim.gif": b"GIF89a",
        "README.md": b"about",
        "train/cat/deeper/00.png": (image_folder / "train/cat/00.png").read_bytes(),
        "train/.DS_Store": b"",
        "__MACOSX/train/cat/._00.png": b"",
        "val/cat/00.png": (image_folder / "train/cat/00.png").read_bytes(),
    }
    zip_path = tmp_path / "extra.zip"
    _write_zip(zip_path, image_folder, top="top")
    with zipfile.ZipFile(zip_path, "a") as archive:
        for member, data in extra.items():
            archive.writestr(f"top/{member}", data)
    with pytest.warns(UserWarning) as record:
        data = load_dataset(str(zip_path), cache_dir=str(cache_dir))
    (warning,) = record
    message = str(warning.message)
    assert message.startswith(f"skipped 7 files of {zip_path}: ") and "\n" not in message
    assert "not .jpg/.jpeg/.png: top/train/cat/notes.txt, top/train/dog/anim.gif" in message
    assert "not at [top/]split/class/file: top/README.md, top/train/cat/deeper/00.png" in message
    assert "hidden or macOS metadata: top/__MACOSX/train/cat/._00.png, top/train/.DS_Store" in (
        message
    )
    assert "split folder neither train nor test: top/val/cat/00.png" in message
    assert warning.filename == __file__  # Points at the caller of load_dataset.
    assert data.class_names == _CLASSES and len(data.train_images) == 12


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 9000)], ids=["pillow_bomb", "ours"])
def test_oversized_image_refused_before_decoding(
    size, image_folder, tmp_path, cache_dir, monkeypatch
):
    (image_folder / "train" / "cat" / "00.png").write_bytes(_png_claiming_size(*size))
    zip_path = tmp_path / "bomb.zip"
    _write_zip(zip_path, image_folder, top=None)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("decoded an oversized image")

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(DataSourceError) as info:
        load_dataset(str(zip_path), cache_dir=str(cache_dir))
    message = str(info.value)
    assert "\n" not in message
    assert f"image {zip_path}:train/cat/00.png is " in message
    assert "over the limit of 67,108,864 pixels" in message and "refused before decoding" in message
    if size == (9000, 9000):
        assert "is 9000x9000 pixels" in message
    assert not _cache_files(cache_dir)


def test_orphaned_cache_temp_files_are_removed(image_zip, cache_dir):
    load_dataset(str(image_zip), cache_dir=str(cache_dir))
    (cache_file,) = _cache_files(cache_dir)
    stem_key = cache_file.name  # tiny_archive-<key>.npz
    old = time.time() - 3600
    orphan = cache_dir / f"{stem_key}.k1ll3d.tmp"  # As _write_cache names them.
    older_version = cache_dir / "tiny_archive-0123456789abcdef.npz.x.tmp"
    fresh = cache_dir / f"{stem_key}.wr1t1ng.tmp"  # Young: maybe being written right now.
    locked = cache_dir / f"{stem_key}.l0ck3d.tmp"  # Old but flock-ed by a live writer.
    other_stem = cache_dir / "other-0123456789abcdef.npz.x.tmp"
    for path in (orphan, older_version, fresh, locked, other_stem):
        path.write_bytes(b"partial")
    for path in (orphan, older_version, locked, other_stem):
        os.utime(path, (old, old))
    with open(locked, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        data = load_dataset(str(image_zip), cache_dir=str(cache_dir))  # From the cache.
        assert sorted(cache_dir.glob("*.tmp")) == sorted([fresh, locked, other_stem])
    assert data.class_names == _CLASSES


def test_decoding_rules_changed_the_cache_key(monkeypatch, image_zip, cache_dir):
    """A cache decoded by version 1's rules (first image's mode, clipped 16-bit) is not reused."""
    monkeypatch.setattr(sources, "_CACHE_FORMAT_VERSION", 1)
    load_dataset(str(image_zip), cache_dir=str(cache_dir))
    monkeypatch.undo()
    load_dataset(str(image_zip), cache_dir=str(cache_dir))
    assert len(_cache_files(cache_dir)) == 2


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'; known: digits, cifar10"):
        load_dataset("imagenet")


@pytest.mark.parametrize("source", ["missing/dir", "missing.zip", "./missing"])
def test_missing_path(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset(source)


def test_corrupt_zip_names_the_file(tmp_path, cache_dir):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip" * 10)
    with pytest.raises(DataSourceError, match="broken.zip"):
        load_dataset(str(bad), cache_dir=str(cache_dir))


def test_inconsistent_class_folders(image_folder, cache_dir):
    (image_folder / "test" / "emu").rename(image_folder / "test" / "yak")
    with pytest.raises(DataSourceError, match=r"only in train: \['emu'\]; only in test: \['yak'\]"):
        load_dataset(str(image_folder), cache_dir=str(cache_dir))


def test_missing_split(image_folder, cache_dir):
    (image_folder / "test").rename(image_folder / "val")
    with pytest.raises(DataSourceError, match="no images under split 'test'"):
        load_dataset(str(image_folder), cache_dir=str(cache_dir))


def test_mixed_image_shapes_name_the_file(image_folder, cache_dir):
    Image.new("RGB", (9, 9)).save(image_folder / "test" / "dog" / "01.png")
    with pytest.raises(DataSourceError, match=r"test/dog/01.png has shape \(9, 9, 3\)"):
        load_dataset(str(image_folder), cache_dir=str(cache_dir))
    assert not _cache_files(cache_dir)


# --------------------------------------------------------------------------------------------
# tensorflow-datasets


@pytest.fixture
def no_download_check(monkeypatch):
    """tfds's mock_data makes every data set look unprepared and mocks its download away; the
    check that download hosts answer (which fails offline) would refuse before that."""
    monkeypatch.setattr(sources, "_preflight_download", lambda builder, name: None)


def test_tfds_cifar10_with_mock_data(tmp_path, no_download_check):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        data = load_dataset("cifar10", data_dir=str(tmp_path))
    assert data.name == "cifar10"
    assert data.train_images.shape == (5, 32, 32, 3) and data.test_images.shape == (5, 32, 32, 3)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    assert ((data.train_labels >= 0) & (data.train_labels < 10)).all()
    assert data.num_classes == 10  # Mock names are "0".."9"; real data gives "airplane", ...
    assert data.mean == sources.DATASET_STATS["cifar10"][0]
    assert data.train_images.std() > 0  # Mock images are random.


def test_tfds_stats_computed_when_unknown(tmp_path, no_download_check):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        data = load_dataset("mnist", data_dir=str(tmp_path))
    assert data.image_shape == (28, 28, 1)
    np.testing.assert_allclose(data.mean, [(data.train_images / 255).mean()])


def test_unknown_tfds_builder_name_is_unknown():
    with pytest.raises(ValueError, match="unknown data set 'no_such_builder_xyz'"):
        load_dataset("no_such_builder_xyz")


# --------------------------------------------------------------------------------------------
# The shared CIFAR-10 archive (listing only; decoding all 60k images is for benchmarks).


@pytest.mark.skipif(not _SHARED_CIFAR_ZIP.exists(), reason="shared CIFAR-10 zip not present")
def test_shared_cifar10_zip_layout():
    with zipfile.ZipFile(_SHARED_CIFAR_ZIP) as archive:
        members = [info.filename for info in archive.infolist() if not info.is_dir()]
    entries, skipped = sources._index_images(members)
    assert not skipped
    assert sources._check_layout(entries, "cifar") == sources.CIFAR10_CLASS_NAMES
    assert sum(e.split == "train" for e in entries) == 50_000
    assert sum(e.split == "test" for e in entries) == 10_000
