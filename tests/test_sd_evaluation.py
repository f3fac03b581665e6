"""SD evaluation (salun_jax.evaluation.sd): NudeNet on a real photo, counting, object UA with the
library's saved classifier, Frechet distance against saved statistics, before/after grids."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from salun_jax.evaluation import generation, sd
from salun_jax.evaluation.sd import Detection

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ASTRONAUT = os.path.join(FIXTURES, "astronaut", "astronaut_256.jpg")


# ---- NudeNet on a real photo -------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    return sd.make_nudity_detector()


@pytest.fixture(scope="module")
def astronaut():
    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))  # [256, 256, 3]


def test_nudenet_finds_the_astronauts_face_and_nothing_exposed(detector, astronaut):
    # Eileen Collins' NASA portrait (public domain; scikit-image's `astronaut`, downsampled).
    black = np.zeros_like(astronaut)
    (found, on_black) = sd.detect_nudity(np.stack([astronaut, black]), detector, batch_size=2)
    labels = [d.label for d in found]
    assert labels and labels[0] == "FACE_FEMALE", found
    face = found[0]
    assert 0.5 < face.score <= 1.0  # 0.776 measured with nudenet 3.4.2 / onnxruntime 1.32.0
    # The face box lies in the upper middle of the photo (x 86, y 40, w 51, h 49 measured).
    x, y, w, h = face.box
    assert 60 <= x <= 110 and 20 <= y <= 60 and 35 <= w <= 70 and 35 <= h <= 70
    assert not [d for d in found if d.label.endswith("_EXPOSED")]
    assert on_black == []
    assert sd.count_nudity_classes([found, on_black], threshold=0.0) == dict.fromkeys(
        sd.NUDENET_EXPOSED_CLASSES, 0
    )
    faces = sd.count_nudity_classes([found, on_black], 0.5, classes=["FACE_FEMALE", "FACE_MALE"])
    assert faces == {"FACE_FEMALE": 1, "FACE_MALE": 0}


def test_detection_matches_the_package_on_the_file(detector, astronaut):
    # RGB arrays are flipped to cv2's BGR: the same as the package reading the JPEG itself.
    (ours,) = sd.detect_nudity(astronaut[None], detector)
    theirs = detector.detect(ASTRONAUT)
    assert [(d.label, d.box) for d in ours] == [(d["class"], tuple(d["box"])) for d in theirs]
    np.testing.assert_allclose([d.score for d in ours], [d["score"] for d in theirs], rtol=1e-6)
    # Grayscale input is repeated to three channels.
    gray = np.asarray(Image.open(ASTRONAUT).convert("L"))[None, ..., None]
    (gray_found,) = sd.detect_nudity(gray, detector)
    assert all(0.25 <= d.score <= 1 for d in gray_found)


def test_detect_nudity_rejects_bad_input_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="uint8 \\[N, H, W, 1 or 3\\]"):
        sd.detect_nudity(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        sd.detect_nudity(np.zeros((8, 8, 3), np.uint8))
    assert sd.detect_nudity(np.zeros((0, 8, 8, 3), np.uint8), detector=object()) == []
    with pytest.raises(FileNotFoundError, match="NudeNet model file .*none.onnx does not exist"):
        sd.make_nudity_detector(tmp_path / "none.onnx")


# ---- counting on constructed detections --------------------------------------------------------


def det(label, score):
    return Detection(label, score, (0, 0, 1, 1))


CONSTRUCTED = [
    [det("FEMALE_BREAST_EXPOSED", 0.9), det("FEMALE_BREAST_EXPOSED", 0.7), det("FACE_FEMALE", 0.9)],
    [det("BELLY_EXPOSED", 0.59), det("BUTTOCKS_EXPOSED", 0.6), det("BELLY_COVERED", 0.95)],
    [],
    [det("MALE_GENITALIA_EXPOSED", 0.3), det("FEMALE_BREAST_EXPOSED", 0.61)],
]


def test_counts_per_image_and_per_detection_at_threshold():
    per_image = sd.count_nudity_classes(CONSTRUCTED, threshold=0.6)
    assert list(per_image) == list(sd.NUDENET_EXPOSED_CLASSES)
    # Breasts: images 0 (two boxes, counted once) and 3; belly 0.59 < 0.6; buttocks 0.6 >= 0.6.
    expected = dict.fromkeys(sd.NUDENET_EXPOSED_CLASSES, 0)
    expected.update(FEMALE_BREAST_EXPOSED=2, BUTTOCKS_EXPOSED=1)
    assert per_image == expected
    per_box = sd.count_nudity_classes(CONSTRUCTED, threshold=0.6, unit="detection")
    assert per_box["FEMALE_BREAST_EXPOSED"] == 3 and per_box["BUTTOCKS_EXPOSED"] == 1
    low = sd.count_nudity_classes(CONSTRUCTED, threshold=0.25)
    assert (low["BELLY_EXPOSED"], low["MALE_GENITALIA_EXPOSED"]) == (1, 1)
    assert sum(sd.count_nudity_classes(CONSTRUCTED, threshold=0.95).values()) == 0
    with pytest.raises(ValueError, match="unit"):
        sd.count_nudity_classes(CONSTRUCTED, unit="box")


def test_count_table_and_markdown_state_detector_and_threshold():
    table = sd.nudity_count_table({"SD": CONSTRUCTED, "SalUn": [[], []]}, threshold=0.6)
    json.dumps(table)  # results.json-able
    assert table["threshold"] == 0.6 and "NudeNet v2" in table["detector"]
    row = table["models"]["SD"]
    assert (row["num_images"], row["total"], row["any_exposed"]) == (4, 3, 3)
    assert table["models"]["SalUn"] == {
        "num_images": 2,
        "any_exposed": 0,
        "total": 0,
        "counts": dict.fromkeys(sd.NUDENET_EXPOSED_CLASSES, 0),
    }
    text = sd.nudity_table_markdown(table)
    assert "score >= 0.6" in text and "nudenet 3.4.2" in text and "not comparable" in text
    assert "| SD | 4 | 0 | 0 | 1 | 0 | 2 | 0 | 0 | 0 | 0 | 3 | 3 |" in text
    assert "| model | images | armpits | belly | buttocks | feet | female breast" in text


def test_v2_to_v3_labels_are_v3_labels():
    assert set(sd.NUDENET_V2_TO_V3.values()) <= set(sd.NUDENET_LABELS)
    exposed_v2 = [k for k in sd.NUDENET_V2_TO_V3 if k.startswith("EXPOSED_")]
    assert {sd.NUDENET_V2_TO_V3[k] for k in exposed_v2} == set(sd.NUDENET_EXPOSED_CLASSES)
    assert len(sd.NUDENET_LABELS) == 18


# ---- object UA with the library's saved classifier ---------------------------------------------


def test_object_metrics_hand_computed_and_class_map():
    prompt_classes = np.array([3, 3, 3, 3, 1, 1, 2, 2])
    predictions = np.array([3, 0, 5, 3, 1, 1, 2, 0])
    out = sd.object_unlearning_metrics(predictions, prompt_classes, forget_class=3)
    assert out["UA"] == 50.0 and out["forget_class_accuracy"] == 50.0
    assert out["per_class_accuracy"] == {"1": 100.0, "2": 50.0, "3": 50.0}
    assert out["retain_accuracy"] == 75.0
    # An ImageNet classifier: indices 0 (tench) and 217 (springer) map to classes 0 and 1;
    # anything else (here 999) is no class, so it counts as "not the forgotten class".
    imagenet = np.array([0, 999, 217, 217])
    mapped = sd.object_unlearning_metrics(
        imagenet, np.array([0, 0, 1, 1]), forget_class=0, class_map=(0, 217)
    )
    assert mapped["UA"] == 50.0 and mapped["per_class_accuracy"] == {"0": 50.0, "1": 100.0}
    none = sd.object_unlearning_metrics(np.array([1]), np.array([1]), forget_class=0)
    assert np.isnan(none["UA"]) and np.isnan(none["forget_class_accuracy"])


@pytest.fixture(scope="module")
def saved_classifier(digits, tmp_path_factory):
    from salun_jax.models import create_model
    from salun_jax.train import TrainConfig, train_classifier

    workdir = str(tmp_path_factory.mktemp("classifier"))
    model = create_model("small_cnn", 10, digits.mean, digits.std, 0.25)
    config = TrainConfig(
        model="small_cnn",
        width=0.25,
        epochs=2,
        batch_size=64,
        milestones=(),
        crop_padding=1,
        flip=False,
    )
    indices = np.arange(len(digits.train_labels))
    state = train_classifier(
        digits.train_images, digits.train_labels, indices, model, config, workdir, progress=False
    ).state
    return workdir, model, config, state


def test_load_classifier_restores_the_saved_weights_and_scores_images(digits, saved_classifier):
    import jax

    from salun_jax.evaluation import make_predict_fn, predict

    workdir, model, config, state = saved_classifier
    shape = digits.train_images.shape[1:]
    variables = sd.load_classifier(workdir, model, shape, config)
    same = sd.load_classifier(os.path.join(workdir, "checkpoints"), model, shape, config)
    for loaded in (variables, same):
        jax.tree.map(np.testing.assert_array_equal, loaded["params"], state.params)
        jax.tree.map(np.testing.assert_array_equal, loaded["batch_stats"], state.batch_stats)
    # Real test digits stand in for generated images. The metrics agree with the DDPM pipeline's
    # `generation.evaluate_samples` run on the trained state's own variables.
    predict_fn = make_predict_fn(model.apply, return_features=True)
    logits, features = predict(predict_fn, variables, digits.test_images)
    labels = digits.test_labels
    out = sd.object_unlearning_metrics(np.argmax(logits, -1), labels, forget_class=3)
    reference = generation.evaluate_samples(
        predict_fn, state.variables, digits.test_images, labels, forget_class=3, num_classes=10
    )
    for key in ("UA", "forget_class_accuracy", "retain_accuracy", "per_class_accuracy"):
        assert out[key] == reference[key], key
    assert out["UA"] == pytest.approx(100 - out["forget_class_accuracy"])
    assert out["retain_accuracy"] > 30  # trained (10% is chance), if briefly
    # FD of the classifier's features: test vs train features is small, blank images far.
    _, train_features = predict(predict_fn, variables, digits.train_images)
    _, blank_features = predict(predict_fn, variables, np.zeros_like(digits.test_images[:50]))
    blank_features = blank_features + np.random.default_rng(0).normal(0, 1e-3, blank_features.shape)
    near = sd.feature_frechet_distance(features, train_features)
    far = sd.feature_frechet_distance(blank_features, train_features)
    assert near < far / 5, (near, far)


def test_load_classifier_errors_leave_the_checkpoint_in_place(digits, saved_classifier, tmp_path):
    from salun_jax.models import create_model

    workdir, _, config, _ = saved_classifier
    shape = digits.train_images.shape[1:]
    wider = create_model("small_cnn", 10, digits.mean, digits.std, 0.5)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(
        ValueError,
        match=r"does not fit the model: params\[.*\] has shape \(8,\), the model \(16,\)",
    ) as info:
        sd.load_classifier(workdir, wider, shape, config)
    assert "\n" not in str(info.value)
    no_momentum = dataclasses.replace(config, momentum=0.0)  # another optimizer state structure
    with pytest.raises(ValueError, match="could not be restored") as info:
        sd.load_classifier(
            workdir, create_model("small_cnn", 10, (0,), (1,), 0.25), shape, no_momentum
        )
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    assert not os.path.exists(os.path.join(workdir, "checkpoints.corrupt"))
    with pytest.raises(FileNotFoundError, match="classifier directory .*nowhere does not exist"):
        sd.load_classifier(tmp_path / "nowhere", wider, shape)
    with pytest.raises(FileNotFoundError, match="no classifier checkpoint in"):
        sd.load_classifier(tmp_path, wider, shape)
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing created by the attempt


# ---- Frechet distance against saved statistics -------------------------------------------------


def test_feature_frechet_distance_hand_computed_and_saved_statistics(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 3))
    generated = reference + np.array([3.0, 0.0, 4.0])  # same covariance, mean shifted by 5
    assert sd.feature_frechet_distance(generated, reference) == pytest.approx(25.0, rel=1e-9)
    path = sd.save_feature_statistics(tmp_path / "ref_stats", reference)
    assert path.endswith("ref_stats")
    mu, sigma = sd.load_feature_statistics(path)
    np.testing.assert_allclose(mu, reference.mean(0))
    np.testing.assert_allclose(sigma, np.cov(reference, rowvar=False))
    assert sd.feature_frechet_distance(generated, path) == pytest.approx(25.0, rel=1e-9)
    assert sd.feature_frechet_distance(generated, (mu, sigma)) == pytest.approx(25.0, rel=1e-9)
    assert generation.classifier_frechet_distance(reference, generated) == pytest.approx(25.0)


def test_feature_statistics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature statistics file .*none.npz does not"):
        sd.load_feature_statistics(tmp_path / "none.npz")
    np.savez(tmp_path / "only_mu.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="has no 'sigma' array"):
        sd.feature_frechet_distance(np.zeros((4, 3)), tmp_path / "only_mu.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(ValueError, match="do not fit"):
        sd.load_feature_statistics(tmp_path / "bad.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="cannot read feature statistics"):
        sd.load_feature_statistics(tmp_path / "plain.npy")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="cannot read feature statistics") as info:
        sd.load_feature_statistics(tmp_path / "text.npz")
    assert "\n" not in str(info.value)


# ---- before/after grid -------------------------------------------------------------------------


def test_before_after_grid_rows_are_model_then_prompt(tmp_path):
    before = np.zeros((2, 3, 4, 4, 3), np.uint8)
    after = np.full((2, 3, 4, 4, 3), 200, np.uint8)
    before[1] = 100
    path = tmp_path / "grid.png"
    captions = sd.save_before_after_grid(
        {"before": before, "after": after}, ["digit 3", "digit 5"], path
    )
    assert captions == ["before: digit 3", "before: digit 5", "after: digit 3", "after: digit 5"]
    picture = np.asarray(Image.open(path))
    # 4 rows, 3 columns of 4 px upscaled to 32 + 2 px padding, bottom-right of the picture
    # (captions on the left, title above: tests/test_pictures.py).
    grid = picture[-(4 * 34 + 2) :, -(3 * 34 + 2) :]
    assert picture.shape[0] > grid.shape[0] and picture.shape[1] > grid.shape[1]
    row_values = [grid[2 + 34 * r + 1, 3, 0] for r in range(4)]  # inside the first cell of a row
    assert row_values == [0, 100, 200, 200]
    with pytest.raises(ValueError, match="must be \\[P=2, S, H, W, C\\]"):
        sd.save_before_after_grid({"x": before[:1]}, ["a", "b"], path)
