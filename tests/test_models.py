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
