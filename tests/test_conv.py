"""Convolution gradient formulations (salun_jax.models.conv): equal to XLA's, chooser, cache."""

import functools
import json
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.losses import classification_loss
from salun_jax.models import conv, create_model, onednn
from salun_jax.optim import make_sgd
from salun_jax.step import create_train_state, make_step

# Every non-XLA choice of each part, and the fixed "custom" plan.
_PLANS = [conv.CUSTOM_PLAN, conv.ConvPlan("im2col", "conv", "swap")]
_PADDINGS = {
    "SAME": "SAME",
    "VALID": "VALID",
    "explicit": ((1, 1), (1, 1)),
    "asymmetric": ((0, 2), (1, 0)),
}


def _fake_times(plan: conv.ConvPlan):
    """time_candidates stand-in: `plan`'s choices take 1 s, every other candidate 2 s."""

    def fake(shape, repeats=7):
        del shape, repeats
        candidates = {
            "forward": conv.FORWARD_CANDIDATES,
            "input_grad": conv.INPUT_GRAD_CANDIDATES,
            "weight_grad": conv.WEIGHT_GRAD_CANDIDATES,
        }
        return {
            part: {name: 1.0 if name == getattr(plan, part) else 2.0 for name in names}
            for part, names in candidates.items()
        }

    return fake


@pytest.fixture
def plan_dir(tmp_path, monkeypatch):
    """The plan cache in a fresh directory (the data cache directory's variable points there)."""
    monkeypatch.setenv("SALUN_JAX_CACHE", str(tmp_path))
    return tmp_path


def _value_and_grads(fn, x, kernel):
    # A non-linear read-out, so the output gradient is not constant.
    return jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), (0, 1))(x, kernel)


@pytest.mark.parametrize("padding", _PADDINGS, ids=str)
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_plans_match_xla(padding, kernel_size, stride):
    # Odd and even sizes: a stride-2 window then leaves a row unread, or not.
    rng = np.random.default_rng(stride * 10 + kernel_size)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 3, 4)), jnp.float32)
    pads = _PADDINGS[padding]
    if isinstance(pads, str):
        pads = jax.lax.padtype_to_pads((7, 6), (kernel_size,) * 2, (stride,) * 2, pads)

    def run(plan):
        return _value_and_grads(
            lambda x, k: conv.conv2d(x, k, (stride, stride), pads, plan), x, kernel
        )

    run = jax.jit(run, static_argnums=0)
    expected = run(conv.XLA_PLAN)
    for plan in _PLANS:
        chex.assert_trees_all_close(run(plan), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", [conv.XLA_PLAN, *_PLANS], ids=str)
def test_plan_hand_computed(plan):
    # All-ones 3x3 input and kernel, SAME padding: each output, each input's gradient of the sum
    # and each kernel tap's gradient counts the in-bounds neighbours: 4 at corners, 6 at edges, 9.
    counts = jnp.array([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])
    x, kernel = jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1))
    y, (dx, dw) = jax.value_and_grad(
        lambda x, k: jnp.sum(conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), plan)), (0, 1)
    )(x, kernel)
    np.testing.assert_allclose(y, 49.0)
    np.testing.assert_allclose(dx[0, :, :, 0], counts)
    np.testing.assert_allclose(dw[:, :, 0, 0], counts)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("padding", ["SAME", 1, "VALID"], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_module_matches_flax(use_bias, padding, stride):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 3)), jnp.float32)
    reference = nn.Conv(4, (3, 3), stride, padding=padding, use_bias=use_bias)
    variables = reference.init(jax.random.key(0), x)
    custom = conv.Conv(4, (3, 3), stride, padding=padding, use_bias=use_bias, conv_impl="custom")
    # Same parameter names and shapes: checkpoints and masks carry over.
    chex.assert_trees_all_equal(custom.init(jax.random.key(0), x), variables)

    def run(module):
        return jax.value_and_grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), (0, 1))(
            variables, x
        )

    chex.assert_trees_all_close(run(custom), run(reference), rtol=1e-5, atol=1e-5)


def test_unsupported_cases_fall_back_to_xla():
    # Grouped and dilated convolutions keep lax.conv_general_dilated (same values, XLA's own).
    x = jnp.ones((1, 6, 6, 4))
    for kwargs in ({"feature_group_count": 2}, {"kernel_dilation": 2}):
        reference, custom = (
            nn.Conv(4, (3, 3), **kwargs),
            conv.Conv(4, (3, 3), conv_impl="auto", **kwargs),
        )
        variables = reference.init(jax.random.key(0), x)
        grads = jax.grad(lambda v, m=custom: jnp.sum(m.apply(v, x) ** 2))(variables)
        expected = jax.grad(lambda v, m=reference: jnp.sum(m.apply(v, x) ** 2))(variables)
        chex.assert_trees_all_close(grads, expected)
    with pytest.raises(ValueError, match="conv_impl"):
        conv.make_conv_general_dilated("fast")


def test_plan_from_times_keeps_xla_unless_clearly_faster():
    times = {
        "forward": {"xla": 1.0, "im2col": 0.97},  # 3% faster: within the margin, keep XLA
        "input_grad": {"xla": 1.0, "conv": 0.5},
        "weight_grad": {"xla": 1.0, "im2col": 0.8, "swap": 0.6},
    }
    assert conv.plan_from_times(times) == conv.ConvPlan("xla", "conv", "swap")
    assert conv.plan_from_times(times, min_gain=0.0) == conv.ConvPlan("im2col", "conv", "swap")


def _shape(batch=2):
    return conv.ConvShape((batch, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), "float32")


def test_plan_cache_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    cache = conv.PlanCache(str(tmp_path))
    assert cache.get(_shape()) is None
    plan = conv.ConvPlan("im2col", "conv", "swap")
    cache.put(_shape(), plan, {"forward": {"xla": 2.0, "im2col": 1.0}})
    # A second process (a fresh cache object) reads it back from disk; other shapes miss.
    again = conv.PlanCache(str(tmp_path))
    assert again.get(_shape()) == plan
    assert again.times(_shape()) == {"forward": {"xla": 2.0, "im2col": 1.0}}
    assert again.get(_shape(batch=3)) is None
    # Keyed by jax version and backend and XLA flags: a different flag set misses.
    (key,) = json.loads((tmp_path / "conv_plans.json").read_text())["entries"]
    assert f"jax{jax.__version__}|{jax.default_backend()}|" in key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")
    assert again.get(_shape()) is None
    # Two writers merge instead of overwriting each other.
    monkeypatch.setenv("XLA_FLAGS", "")
    cache.put(_shape(batch=3), conv.XLA_PLAN)
    again.put(_shape(batch=4), conv.CUSTOM_PLAN)
    last = conv.PlanCache(str(tmp_path))
    assert [last.get(_shape(b)) for b in (2, 3, 4)] == [plan, conv.XLA_PLAN, conv.CUSTOM_PLAN]
    # A damaged file is ignored (re-measured), not fatal.
    (tmp_path / "conv_plans.json").write_text("{not json")
    assert conv.PlanCache(str(tmp_path)).get(_shape()) is None


def test_choose_plan_times_each_shape_once(tmp_path, monkeypatch):
    calls = []
    fake = _fake_times(conv.ConvPlan("im2col", "conv", "im2col"))
    monkeypatch.setattr(conv, "time_candidates", lambda s, r=7: calls.append(s) or fake(s, r))
    cache = conv.PlanCache(str(tmp_path))
    for _ in range(2):
        assert conv.choose_plan(_shape(), cache) == conv.ConvPlan("im2col", "conv", "im2col")
    assert calls == [_shape()]
    assert conv.PlanCache(str(tmp_path)).get(_shape()) == conv.ConvPlan("im2col", "conv", "im2col")


def test_time_candidates_times_every_candidate():
    times = conv.time_candidates(_shape(), repeats=2)
    # oneDNN's are candidates only where it is installed (tests/test_onednn.py).
    usable = {"onednn"} if onednn.available() else set()
    assert {part: set(t) for part, t in times.items()} == {
        "forward": {*conv.FORWARD_CANDIDATES} - {"onednn"} | usable,
        "input_grad": {*conv.INPUT_GRAD_CANDIDATES} - {"onednn"} | usable,
        "weight_grad": {*conv.WEIGHT_GRAD_CANDIDATES} - {"onednn"} | usable,
    }
    assert all(t > 0 for part in times.values() for t in part.values())


def test_auto_times_only_where_a_gradient_is_taken(plan_dir, monkeypatch):
    calls = []
    fake = _fake_times(conv.CUSTOM_PLAN)
    monkeypatch.setattr(conv, "time_candidates", lambda s, r=7: calls.append(s) or fake(s, r))
    model = create_model("small_cnn", 10, (0.5,), (0.25,), 0.25, conv_impl="auto")
    x = jnp.zeros((4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    model.apply(variables, x)
    assert calls == []  # init and inference: nothing timed
    jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x))))(
        variables["params"]
    )
    assert len(calls) == 3  # one per conv layer shape
    assert (plan_dir / "conv_plans.json").exists()


@pytest.mark.parametrize("name", ["small_cnn", "vgg16_bn"])
def test_models_have_the_same_parameters_for_every_impl(name):
    shape = (1, 8, 8, 3) if name == "small_cnn" else (1, 32, 32, 3)
    trees = [
        jax.eval_shape(
            create_model(name, 10, (0.5,) * 3, (0.25,) * 3, 0.125, impl).init,
            jax.random.key(0),
            jnp.zeros(shape),
        )
        for impl in conv.CONV_IMPLS
        if impl != "onednn" or onednn.available()
    ]
    for tree in trees[1:]:
        chex.assert_trees_all_equal_shapes_and_dtypes(tree, trees[0])
        assert jax.tree.structure(tree) == jax.tree.structure(trees[0])


def test_default_conv_impl(monkeypatch):
    monkeypatch.delenv(conv.CONV_IMPL_ENV_VAR, raising=False)
    assert conv.default_conv_impl("custom") == "custom"
    assert conv.default_conv_impl() == conv._DEFAULT_CONV_IMPL
    monkeypatch.setenv(conv.CONV_IMPL_ENV_VAR, "auto")
    assert conv.default_conv_impl() == "auto"
    monkeypatch.setenv(conv.CONV_IMPL_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="conv_impl"):
        conv.default_conv_impl()


def test_resnet_train_step_equal_across_impls(plan_dir, monkeypatch):
    # ResNet-8 x0.25 (stride-2 3x3 and 1x1 shortcut convs, padding 1 and 0) on small images:
    # "auto" is made to pick a non-XLA candidate in every part (the fixed "custom" plan's parts
    # are covered layer by layer above; one more ResNet compile would cost ~20 s), and "plain"
    # (no materialised inputs) is checked against "xla".
    monkeypatch.setattr(
        conv, "time_candidates", _fake_times(conv.ConvPlan("im2col", "conv", "swap"))
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
        "weight": np.ones(8, np.float32),
    }
    results = {}
    for impl in ("xla", "auto", "plain"):
        model = create_model("resnet8", 10, (0.5,) * 3, (0.25,) * 3, 0.25, impl)
        state = create_train_state(
            model, jax.random.key(0), (16, 16, 3), make_sgd(0.1, momentum=0.9)
        )
        step = jax.jit(make_step(classification_loss(), axis_name=None))
        # One step: later steps amplify float differences through BatchNorm (the gradients
        # themselves agree to ~3e-6 relative per leaf here).
        state, metrics = step(state, batch, jax.random.key(1))
        results[impl] = (state.params, state.batch_stats, metrics)
    chex.assert_trees_all_close(results["auto"], results["xla"], rtol=1e-4, atol=1e-5)
    # Materialised inputs ("xla") vs XLA left to fuse them ("plain"), crop + flip included.
    chex.assert_trees_all_close(results["plain"], results["xla"], rtol=1e-4, atol=1e-5)
    # One timed entry per distinct layer shape: stem, 16@16, then 3 per later stage.
    assert len(json.loads((plan_dir / "conv_plans.json").read_text())["entries"]) == 1 + 1 + 3 * 2


def test_materialize_is_the_identity_under_every_transform():
    x = jnp.linspace(-3.0, 3.0, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)

    def plain(x):
        return jnp.sum(jnp.sin(x) * x**2)

    def through(x):
        return jnp.sum(jnp.sin(conv.materialize(x)) * conv.materialize(x) ** 2)

    np.testing.assert_array_equal(conv.materialize(x), x)
    np.testing.assert_array_equal(jax.jit(conv.materialize)(x), x)
    np.testing.assert_array_equal(jax.vmap(conv.materialize)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(through))(x), jax.jit(jax.grad(plain))(x))
    tangent = jnp.cos(x)
    np.testing.assert_array_equal(
        jax.jvp(through, (x,), (tangent,))[1], jax.jvp(plain, (x,), (tangent,))[1]
    )
    empty = jnp.zeros((0, 4, 4, 3))
    assert conv.materialize(empty).shape == empty.shape
    small = x[:1, :1, :2, :2]  # forward-over-reverse (Hessian) works too
    np.testing.assert_array_equal(jax.hessian(through)(small), jax.hessian(plain)(small))


def _resnet8_gradient(impl: str):
    """(compiled HLO text, gradients) of a ResNet-8 x0.25 train-mode loss with `impl`."""
    model = create_model("resnet8", 10, (0.5,) * 3, (0.25,) * 3, 0.25, impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits**2)

    compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    return compiled.as_text(), compiled(variables["params"])


def _fused_activation_transposes(hlo: str, batch: int = 8) -> int:
    """Fusions transposing a convolution input to [C, H, W, batch] (the weight gradient's
    layout) that read more than one operand, i.e. recompute the input's producers instead of
    reading one buffer. (Output-gradient transposes, [H, W, batch, O], are not counted.)"""
    found = re.findall(r"%\S*transpose\S* = \w+\[\d+,\d+,\d+,(\d+)\]\S* fusion\(([^)]*)\)", hlo)
    return sum(int(last) == batch and len(operands.split(",")) > 1 for last, operands in found)


def test_materialized_inputs_keep_producers_out_of_weight_gradient_transposes():
    if jax.default_backend() != "cpu":
        pytest.skip("materialize applies on the CPU backend only")
    hlo_plain, grads_plain = _resnet8_gradient("plain")
    hlo_xla, grads_xla = _resnet8_gradient("xla")
    # Same values to the bit: materialize changes only what XLA may fuse.
    chex.assert_trees_all_equal(grads_xla, grads_plain)
    if _fused_activation_transposes(hlo_plain) == 0:
        pytest.skip("this XLA does not fuse producers into the weight-gradient transposes")
    assert _fused_activation_transposes(hlo_xla) == 0


def _conv64(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions inside the computations that YNNPACK fusions call, in compiled HLO text."""
    called = set(re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", hlo))
    count, inside = 0, False
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            inside = line.split()[0] in called
        elif inside and " convolution(" in line:
            count += 1
    return count


def test_compiler_options_keep_ynnpack_off_convolutions_in_the_loop(monkeypatch):
    from salun_jax import loop

    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR, raising=False)
    x, w = jnp.ones((8, 8, 8, 64)), jnp.full((3, 3, 64, 64), 0.01)
    lowered = jax.jit(_conv64).lower(x, w)
    if "__ynn_fusion" not in lowered.compile().as_text():
        pytest.skip("this XLA does not hand the 64-channel convolution to YNNPACK")
    assert _ynn_convolutions(lowered.compile().as_text()) == 1  # the helper sees XLA's default
    options = conv.compiler_options()
    assert options  # the CPU backend, no opt-out
    ours = lowered.compile(compiler_options=options)
    assert "__ynn_fusion" not in ours.as_text() and "convolution(" in ours.as_text()
    np.testing.assert_allclose(ours(x, w), lowered.compile()(x, w), rtol=1e-5)

    # The loop compiles its steps with them (a step of one convolution and no reduction, which
    # YNNPACK would still take).
    def step(state, batch, rng):
        del rng
        return state, {"out": _conv64(batch["image"], state)}

    devices = jax.local_device_count()
    indices = np.zeros((devices, 2), np.int32)
    compiled, _ = loop.compiled_step(
        step,
        loop.replicate(w),
        loop.replicate({"image": np.ones((4, 8, 8, 64), np.float32)}),
        indices,
        np.ones((devices, 2), np.float32),
        jax.random.key(0),
    )
    assert "__ynn_fusion" not in compiled.as_text() and "convolution(" in compiled.as_text()

    # Opt-outs: XLA's defaults, or the user's own XLA_FLAGS setting.
    monkeypatch.setenv(conv.YNN_CONVOLUTIONS_ENV_VAR, "1")
    assert conv.compiler_options() == {}
    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR)
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
    )
    assert conv.compiler_options() == {}


def test_predictions_compile_with_the_convolution_options(monkeypatch):
    from salun_jax.evaluation.classification import make_predict_fn

    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR, raising=False)
    model = create_model("small_cnn", 10, (0.5,) * 3, (0.25,) * 3, width=1.0)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    images = np.zeros((8, 16, 16, 3), np.uint8)
    plain = jax.jit(lambda v, x: model.apply(v, x.astype(jnp.float32), train=False))
    by_default = _ynn_convolutions(plain.lower(variables, images).compile().as_text())
    if by_default == 0:
        pytest.skip("this XLA does not hand the model's convolutions to YNNPACK")
    predict_fn = make_predict_fn(model.apply)
    ours = _ynn_convolutions(predict_fn.lower(variables, images).compile().as_text())
    # YNNPACK may still take the last convolution inside the global pool's reduction fusion.
    assert ours <= 1 < by_default


def test_jit_reads_the_options_at_the_first_call(monkeypatch):
    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR, raising=False)
    reads = []
    real = conv.compiler_options
    monkeypatch.setattr(conv, "compiler_options", lambda: reads.append(1) or real())

    @functools.partial(conv.jit, static_argnums=(2,))
    def scaled_conv(x, w, scale):
        return _conv64(x, w) * scale

    assert reads == []  # nothing at decoration: the backend may not be up yet
    x, w = jnp.ones((2, 4, 4, 64)), jnp.full((3, 3, 64, 64), 0.01)
    np.testing.assert_allclose(scaled_conv(x, w, 2.0), 2.0 * _conv64(x, w), rtol=1e-5)
    scaled_conv(x, w, 3.0)
    assert reads == [1]
    if conv.compiler_options():
        assert _ynn_convolutions(scaled_conv.lower(x, w, 2.0).compile().as_text()) == 0
    # Inside another jit (which alone may carry compiler options) it is a plain nested jit.
    nested = jax.jit(lambda x, w: scaled_conv(x, w, 2.0))
    np.testing.assert_allclose(nested(x, w), 2.0 * _conv64(x, w), rtol=1e-5)
