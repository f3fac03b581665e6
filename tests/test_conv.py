"""The CPU wing's convolutions and options (salun_jax.cpu, salun_jax.cpu.conv): the same
parameters as nn.Conv, materialised inputs, YNNPACK kept off convolutions, `enable`."""

import json
import os
import re
import subprocess
import sys
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import salun_jax.cpu
from salun_jax.cpu import conv, onednn
from salun_jax.models import create_model, default_conv, set_default_conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONVS = {"nn.Conv": nn.Conv, "xla": conv.Conv, "onednn": onednn.Conv}


def _param_shapes(model, image_shape):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    return jax.tree_util.tree_map_with_path(lambda path, x: x.shape, variables)


@pytest.mark.parametrize(
    "name, image_shape",
    [("small_cnn", (8, 8, 1)), ("resnet8", (16, 16, 3)), ("resnet50", (16, 16, 3))],
)
def test_every_conv_module_gives_the_same_parameters(name, image_shape):
    # Checkpoints and masks do not depend on the module: same names (Conv_0, conv1, ...) and
    # shapes. eval_shape traces no convolution, so oneDNN's module needs no build here.
    shapes = {
        label: _param_shapes(create_model(name, 10, (0.5,), (0.25,), 0.25, module), image_shape)
        for label, module in _CONVS.items()
    }
    assert shapes["xla"] == shapes["nn.Conv"] and shapes["onednn"] == shapes["nn.Conv"]
    # The same repr too: the pipelines fingerprint work by it, and it must not split on the
    # convolution module (nor change from one process to the next).
    reprs = {repr(create_model(name, 10, (0.5,), (0.25,), 0.25, m)) for m in _CONVS.values()}
    assert len(reprs) == 1 and "0x" not in reprs.pop()
    if name == "small_cnn":
        assert {"Conv_0", "Conv_1", "Conv_2"} <= set(shapes["nn.Conv"]["params"])


def test_create_model_uses_the_default_conv():
    before = default_conv()
    try:
        set_default_conv(nn.Conv)
        assert create_model("small_cnn", 10, (0.5,), (0.25,)).conv is nn.Conv
        set_default_conv(conv.Conv)
        assert create_model("small_cnn", 10, (0.5,), (0.25,)).conv is conv.Conv
        # Equal models for equal settings: compiled steps are reused across runs.
        assert create_model("resnet8", 10, (0.5,), (0.25,)) == create_model(
            "resnet8", 10, (0.5,), (0.25,)
        )
        assert create_model("small_cnn", 10, (0.5,), (0.25,), conv=nn.Conv).conv is nn.Conv
    finally:
        set_default_conv(before)


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


def _resnet8_gradient(conv_module):
    """(compiled HLO text, gradients) of a ResNet-8 x0.25 train-mode loss with `conv_module`."""
    model = create_model("resnet8", 10, (0.5,) * 3, (0.25,) * 3, 0.25, conv_module)
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

    # XLA's default (MLIR) fusion emitters, as the library runs: the test suite compiles with
    # the older ones (tests/conftest.py), whose fusions round differently.
    compiled = (
        jax.jit(jax.grad(loss))
        .lower(variables["params"])
        .compile({"xla_cpu_use_fusion_emitters": True})
    )
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
    hlo_plain, grads_plain = _resnet8_gradient(nn.Conv)
    hlo_xla, grads_xla = _resnet8_gradient(conv.Conv)
    # Same values to the bit: materialize changes only what XLA may fuse.
    chex.assert_trees_all_equal(grads_xla, grads_plain)
    if _fused_activation_transposes(hlo_plain) == 0:
        pytest.skip("this XLA does not fuse producers into the weight-gradient transposes")
    assert _fused_activation_transposes(hlo_xla) == 0


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


def test_xla_flag_and_its_opt_outs(monkeypatch):
    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    flag = conv.xla_flag()
    assert flag is None or flag.startswith("--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.setenv(conv.YNN_CONVOLUTIONS_ENV_VAR, "1")  # XLA's default
    assert conv.xla_flag() is None
    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR)
    monkeypatch.setenv(  # the user's own setting wins
        "XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
    )
    assert conv.xla_flag() is None


def test_enable_checks_its_arguments_and_a_running_backend(monkeypatch):
    before = default_conv()
    monkeypatch.setenv(salun_jax.cpu.CONV_ENV_VAR, "auto")
    with pytest.raises(ValueError, match=r"\$SALUN_JAX_CONV_IMPL must be one of xla, onednn"):
        salun_jax.cpu.enable()
    with pytest.raises(ValueError, match="conv must be one of"):
        salun_jax.cpu.enable(conv="plain")
    monkeypatch.delenv(salun_jax.cpu.CONV_ENV_VAR)
    monkeypatch.delenv(conv.YNN_CONVOLUTIONS_ENV_VAR, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    jax.devices()  # the backend runs: too late for XLA_FLAGS, and enable says so
    try:
        if conv.xla_flag() is not None:
            with pytest.warns(UserWarning, match="backend is running"):
                settings = salun_jax.cpu.enable(keep_host_memory=False)
            assert "XLA_FLAGS" not in os.environ
        else:
            settings = salun_jax.cpu.enable(keep_host_memory=False)
        assert settings == {"conv": "xla", "xla_flag": None, "host_memory": False}
        assert default_conv() is conv.Conv
        flag = conv.xla_flag()
        if flag is not None:  # a second call (the README's in a test process): quiet, no change
            monkeypatch.setenv("XLA_FLAGS", flag)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert salun_jax.cpu.enable(keep_host_memory=False)["xla_flag"] is None
            assert os.environ["XLA_FLAGS"] == flag
    finally:
        set_default_conv(before)


# What a script's process compiles after `enable()`: a 64-channel convolution alone, a SmallCNN
# prediction and a loop step, each as compiled HLO text.
_ENABLED_SCRIPT = """
import json, sys
import numpy as np
import salun_jax.cpu
settings = salun_jax.cpu.enable()
import salun_jax.cpu.conv
import jax, jax.numpy as jnp
from salun_jax import loop
from salun_jax.evaluation.classification import make_predict_fn
from salun_jax.models import create_model

def conv64(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

x, w = jnp.ones((8, 8, 8, 64)), jnp.full((3, 3, 64, 64), 0.01)
alone = jax.jit(conv64).lower(x, w).compile().as_text()
model = create_model("small_cnn", 10, (0.5,) * 3, (0.25,) * 3, width=1.0)
variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
predict = make_predict_fn(model.apply).lower(variables, np.zeros((8, 16, 16, 3), np.uint8))

def step(state, batch, rng):
    return state, {"out": conv64(batch["image"], state)}

n = jax.local_device_count()
compiled, _ = loop.compiled_step(
    step, loop.replicate(w), loop.replicate({"image": np.ones((4, 8, 8, 64), np.float32)}),
    np.zeros((n, 2), np.int32), np.ones((n, 2), np.float32), jax.random.key(0))
print(json.dumps({"settings": settings, "alone": alone, "predict": predict.compile().as_text(),
                  "step": compiled.as_text(),
                  "wing_conv": model.conv is salun_jax.cpu.conv.Conv}))
"""


def _enabled_process(**env_vars) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **env_vars}
    for name in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS"):  # the library's XLA settings
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", _ENABLED_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_enable_keeps_ynnpack_off_every_programs_convolutions():
    default = _enabled_process(SALUN_JAX_YNN_CONVOLUTIONS="1")  # XLA's own default
    assert default["settings"]["xla_flag"] is None
    if _ynn_convolutions(default["alone"]) == 0:
        pytest.skip("this XLA does not hand the 64-channel convolution to YNNPACK")
    ours = _enabled_process()
    assert ours["settings"]["xla_flag"] and ours["settings"]["conv"] == "xla"
    assert ours["wing_conv"] and default["wing_conv"]  # the models get the wing's module
    for program in ("alone", "step"):
        assert "__ynn_fusion" not in ours[program] and "convolution(" in ours[program]
    # YNNPACK may still take the last convolution inside the global pool's reduction fusion.
    assert _ynn_convolutions(ours["predict"]) <= 1 < _ynn_convolutions(default["predict"])
