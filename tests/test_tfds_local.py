"""tensorflow-datasets for real, without network or mocks: a tiny tfds builder generates its
images here, prepares them as array_record, and `load_dataset` reads them through its tfds path;
offline, an unprepared data set fails within seconds with a one-line hint."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from salun_jax.data import sources  # noqa: E402
from salun_jax.data.sources import DataSourceError, load_dataset  # noqa: E402

_NAME = "salun_jax_tiny_images"  # tfds registers the builder below under its snake_case name.
_CLASSES = ("ant", "bee", "cow")
_COUNTS = {"train": 14, "test": 6}
_SHAPE = (6, 5, 3)


def _examples(split: str) -> list[tuple[np.ndarray, int]]:
    """The (image, label) pairs the builder writes: random pixels, labels cycling the classes."""
    rng = np.random.default_rng([_COUNTS[split], 7])
    return [
        (rng.integers(0, 256, _SHAPE, dtype=np.uint8), index % len(_CLASSES))
        for index in range(_COUNTS[split])
    ]


def _png(pixels: np.ndarray) -> bytes:
    # tfds encodes numpy images with TensorFlow; encoded bytes need no TensorFlow.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class SalunJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """20 small RGB images in 3 classes, generated locally (nothing to download)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=_SHAPE),
                    "label": tfds.features.ClassLabel(names=list(_CLASSES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in _COUNTS}

    def _generate_examples(self, split):
        for index, (pixels, label) in enumerate(_examples(split)):
            yield f"{split}_{index}", {"image": _png(pixels), "label": label}


def assert_tfds_hint(message: str, name: str) -> None:
    """One line saying how to prepare the data elsewhere and pass data_dir, in Python or scripts,
    naming no path that only exists beside this repository."""
    assert "\n" not in message
    assert f"tfds build {name} --file_format=array_record --data_dir=DIR" in message
    assert f"load_dataset({name!r}, data_dir=DIR)" in message
    assert "scripts: --config.data_dir=DIR" in message
    assert "shared" not in message


def _sorted_pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    # tfds shuffles records by key hash: compare contents as multisets.
    return sorted(
        (int(label), image.tobytes()) for image, label in zip(images, labels, strict=True)
    )


def _assert_generated_data(data) -> None:
    assert data.name == _NAME
    assert data.class_names == _CLASSES
    assert data.image_shape == _SHAPE
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    for split in _COUNTS:
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        expected = _examples(split)
        assert len(images) == len(expected)
        assert _sorted_pairs(images, labels) == sorted(
            (label, pixels.tobytes()) for pixels, label in expected
        )
    np.testing.assert_allclose(data.mean, (data.train_images / 255).mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(data.std, (data.train_images / 255).std(axis=(0, 1, 2)))


def test_locally_built_tfds_data_set_loads_through_load_dataset(tmp_path):
    builder = tfds.builder(_NAME, data_dir=str(tmp_path), file_format="array_record")
    assert isinstance(builder, SalunJaxTinyImages)
    builder.download_and_prepare()
    assert sorted(p.name for p in builder.data_path.glob("*.array_record*")) == [
        f"{_NAME}-test.array_record-00000-of-00001",
        f"{_NAME}-train.array_record-00000-of-00001",
    ]
    data = load_dataset(_NAME, data_dir=str(tmp_path), download=False)
    _assert_generated_data(data)


def test_load_dataset_prepares_a_local_builder_and_then_reads_without_preparing(
    tmp_path, monkeypatch
):
    data = load_dataset(_NAME, data_dir=str(tmp_path))  # download=True: prepares it.
    _assert_generated_data(data)

    def no_prepare(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(SalunJaxTinyImages, "download_and_prepare", no_prepare)
    monkeypatch.setattr(sources, "_probe_urls", no_prepare)
    again = load_dataset(_NAME, data_dir=str(tmp_path))
    assert again.fingerprint() == data.fingerprint()


def test_cifar10_not_prepared_without_download(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataSourceError, match="not prepared in .* and download=False") as info:
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert time.monotonic() - start < 20
    assert_tfds_hint(str(info.value), "cifar10")
    assert str(tmp_path) in str(info.value)


def test_local_builder_not_prepared_without_download(tmp_path):
    with pytest.raises(DataSourceError, match="download=False") as info:
        load_dataset(_NAME, data_dir=str(tmp_path), download=False)
    assert_tfds_hint(str(info.value), _NAME)


@pytest.fixture
def offline(monkeypatch):
    """No network, deterministically: every HTTP(S) request goes to a proxy that refuses."""
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # discard port: nothing listens.
        monkeypatch.setenv(variable.lower(), "http://127.0.0.1:9")


def test_offline_cifar10_fails_fast_with_one_line_hint(tmp_path, offline):
    data_dir = tmp_path / "tfds"
    start = time.monotonic()
    with pytest.raises(DataSourceError) as info:
        load_dataset("cifar10", data_dir=str(data_dir))  # download=True, nothing prepared.
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"took {elapsed:.1f} s"
    message = str(info.value)
    assert message.startswith(
        f"tensorflow-datasets data set 'cifar10' is not prepared in {data_dir}/cifar10/"
    )
    assert "cannot be downloaded here (no answer from its download host: www.cs.toronto.edu: " in (
        message
    )
    assert_tfds_hint(message, "cifar10")
    assert not list(data_dir.glob("**/*.tar.gz"))  # Nothing was downloaded.
