import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.models import create_model


def _count(model, shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, width, classes, expected",
    [
        (
            "resnet18",
            1.0,
            10,
            11_173_962,
        ),  # the upstream CIFAR ResNet-18 (upstream `Classification/models/ResNet.py`)
        ("resnet18", 1.0, 100, 11_220_132),  # fc grows by 512 * 90 + 90
        ("resnet50", 1.0, 10, 23_520_842),
        ("vgg16_bn", 1.0, 10, 15_311_818),  # 14,710,464 conv + 8,448 BN + 592,906 classifier
    ],
)
def test_parameter_counts(name, width, classes, expected):
    model = create_model(name, classes, (0.5,) * 3, (0.25,) * 3, width)
    assert _count(model, (1, 32, 32, 3)) == expected


def test_width_multiplier_shrinks_resnet():
    full = _count(create_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3), (1, 32, 32, 3))
    quarter = _count(create_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3, 0.25), (1, 32, 32, 3))
    assert quarter < full / 10


@pytest.mark.parametrize("name, shape", [("small_cnn", (2, 8, 8, 1)), ("resnet8", (2, 32, 32, 3))])
def test_forward_shapes_and_batch_stats(name, shape):
    c = shape[-1]
    model = create_model(name, 7, (0.5,) * c, (0.25,) * c, 0.25)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    x = jax.random.uniform(jax.random.key(1), shape)
    logits = model.apply(variables, x, train=False)
    chex.assert_shape(logits, (shape[0], 7))
    chex.assert_tree_all_finite(logits)
    logits_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_shape(logits_train, (shape[0], 7))
    # Train mode updates the running statistics; eval mode does not use batch statistics.
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
    )
    assert any(jax.tree.leaves(changed))


def test_normalisation_inside_model():
    model = create_model("small_cnn", 3, (0.5,), (0.25,), 0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    # A constant image equal to the mean becomes zeros after normalisation; the conv stack has no
    # bias and BN in eval mode maps 0 -> beta - mean * gamma / sqrt(var + eps) = 0 at init.
    _, feats = model.apply(
        variables, jnp.full((1, 8, 8, 1), 0.5), train=False, return_features=True
    )
    np.testing.assert_allclose(feats, 0.0, atol=1e-6)


def test_pytorch_like_init():
    model = create_model("resnet18", 10, (0.5,) * 3, (0.25,) * 3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    bound = 1 / np.sqrt(512)
    assert np.abs(params["fc"]["Dense_0"]["kernel"]).max() <= bound
    assert np.abs(params["fc"]["Dense_0"]["bias"]).max() <= bound
    conv = np.asarray(params["conv1"]["kernel"])  # [3, 3, 3, 64]; fan_out = 3 * 3 * 64
    assert abs(conv.std() - np.sqrt(2 / (9 * 64))) < 0.02
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet19'; known:"):
        create_model("resnet19", 10, (0.5,), (0.2,))


def _padded_step_states(name, apply_fn=None):
    """One train-mode step on n = 6 real examples, and on the same 6 plus k = 4 weight-0 rows."""
    from salun_jax import optim
    from salun_jax.losses import classification_loss
    from salun_jax.step import create_train_state, make_step

    model = create_model(name, 10, (0.5,), (0.25,), width=0.25)
    state = create_train_state(model, jax.random.key(0), (8, 8, 1), optim.make_sgd(0.1))
    if apply_fn is not None:
        state = state.replace(apply_fn=apply_fn(model))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 10).astype(np.int32)
    weights = np.array([1.0] * 6 + [0.0] * 4, np.float32)
    # No augmentation: its random draws depend on the batch size.
    step = jax.jit(make_step(classification_loss(crop_padding=0, flip=False), axis_name=None))
    key = jax.random.key(1)
    real = {"image": images[:6], "label": labels[:6], "weight": weights[:6]}
    padded = {"image": images, "label": labels, "weight": weights}
    return step(state, real, key)[0], step(state, padded, key)[0]


@pytest.mark.parametrize("name", ["small_cnn", "resnet8"])
def test_batch_norm_statistics_ignore_padding(name):
    unpadded, padded = _padded_step_states(name)
    chex.assert_trees_all_close(padded.params, unpadded.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(padded.batch_stats, unpadded.batch_stats, atol=1e-5, rtol=1e-5)

    # Teeth: the same step with the mask dropped (padding in the statistics) differs.
    def unmasked(model):
        return lambda variables, x, batch_mask=None, **kwargs: model.apply(variables, x, **kwargs)

    unpadded, padded = _padded_step_states(name, unmasked)
    stats = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), padded.batch_stats, unpadded.batch_stats)
    )
    params = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.abs(a - b).max(), padded.params, unpadded.params)
    )
    assert max(stats) > 1e-3 and max(params) > 1e-4


def test_all_padding_shard_falls_back_to_all_rows():
    """A pmapped shard with no real example must not take an empty mean (NaN statistics)."""
    from salun_jax import optim
    from salun_jax.losses import classification_loss
    from salun_jax.step import create_train_state, make_step

    model = create_model("small_cnn", 10, (0.5,), (0.25,), width=0.25)
    state = create_train_state(model, jax.random.key(0), (8, 8, 1), optim.make_sgd(0.1))
    batch = {
        "image": np.full((4, 8, 8, 1), 100, np.uint8),
        "label": np.zeros(4, np.int32),
        "weight": np.zeros(4, np.float32),
    }
    step = jax.jit(make_step(classification_loss(crop_padding=0, flip=False), axis_name=None))
    new_state, _ = step(state, batch, jax.random.key(1))
    chex.assert_tree_all_finite(new_state.batch_stats)
