"""oneDNN convolutions through the XLA FFI (salun_jax.cpu.onednn, `enable(conv="onednn")`)."""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from salun_jax.cpu import onednn
from salun_jax.losses import classification_loss
from salun_jax.models import create_model
from salun_jax.optim import make_sgd
from salun_jax.step import create_train_state, make_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where oneDNN is installed (pip install -e ".[cpu-onednn]", x86-64 Linux); elsewhere they skip.
needs_onednn = pytest.mark.skipif(
    not onednn.available(), reason=f"oneDNN convolutions unavailable: {onednn.unavailable_reason()}"
)


def _value_and_grads(fn, x, kernel):
    # A non-linear read-out, so the output gradient is not constant.
    return jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), (0, 1))(x, kernel)


@needs_onednn
@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding"),
    [
        (3, 1, ((1, 1), (1, 1))),
        (3, 2, ((1, 1), (1, 1))),
        (3, 2, ((0, 1), (0, 1))),  # "SAME" at stride 2 on even sizes
        (1, 2, ((0, 0), (0, 0))),  # ResNet shortcut
        (5, 1, ((2, 1), (0, 2))),  # asymmetric, and H != W below
        (3, 3, ((0, 0), (0, 0))),  # the stride leaves rows unread
    ],
    ids=str,
)
def test_forward_and_gradients_match_xla(kernel_size, stride, padding):
    rng = np.random.default_rng(kernel_size * 10 + stride)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 5, 6)), jnp.float32)
    strides = (stride, stride)

    def xla(x, k):
        return jax.lax.conv_general_dilated(
            x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def run(conv2d):
        return _value_and_grads(conv2d, x, kernel)

    run = jax.jit(run, static_argnums=0)
    # Float rounding only (another summation order): within 1e-5 of each output's largest value.
    got_leaves = jax.tree.leaves(run(lambda x, k: onednn.conv2d(x, k, strides, padding)))
    for got, expected in zip(got_leaves, jax.tree.leaves(run(xla)), strict=True):
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)


@needs_onednn
def test_hand_computed():
    # All-ones 3x3 input and kernel, padding 1: each output, each input's gradient of the sum and
    # each kernel tap's gradient counts the in-bounds neighbours: 4 at corners, 6 at edges, 9.
    counts = np.array([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])
    x, kernel, pads = jnp.ones((1, 3, 3, 1)), jnp.ones((3, 3, 1, 1)), ((1, 1), (1, 1))
    y = onednn.forward(x, kernel, (1, 1), pads)
    dx = onednn.input_grad(jnp.ones_like(y), kernel, x.shape, (1, 1), pads)
    dw = onednn.weight_grad(x, jnp.ones_like(y), kernel.shape, (1, 1), pads)
    np.testing.assert_array_equal(y[0, :, :, 0], counts)
    np.testing.assert_array_equal(dx[0, :, :, 0], counts)
    np.testing.assert_array_equal(dw[:, :, 0, 0], counts)


@needs_onednn
def test_deterministic_and_vmapped():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 8)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 16)), jnp.float32)
    pads = ((1, 1), (1, 1))

    def grads(kernel):
        return _value_and_grads(lambda x, k: onednn.conv2d(x, k, (2, 2), pads), x, kernel)

    # A population (one kernel per member) runs member by member: same as separate calls.
    first, second = jax.jit(jax.vmap(grads))(kernels), jax.jit(jax.vmap(grads))(kernels)
    chex.assert_trees_all_equal(first, second)  # bit for bit, run to run
    y = jax.vmap(lambda k: onednn.forward(x, k, (2, 2), pads))(kernels)
    for member in range(3):
        chex.assert_trees_all_equal(y[member], onednn.forward(x, kernels[member], (2, 2), pads))


@needs_onednn
def test_resnet_train_step_matches_xla_and_has_no_xla_convolutions():
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
        "weight": np.ones(8, np.float32),
    }
    results, hlo = {}, {}
    for impl, conv_module in (("xla", nn.Conv), ("onednn", onednn.Conv)):
        model = create_model("resnet8", 10, (0.5,) * 3, (0.25,) * 3, 0.25, conv_module)
        state = create_train_state(
            model, jax.random.key(0), (16, 16, 3), make_sgd(0.1, momentum=0.9)
        )
        step = jax.jit(make_step(classification_loss(), axis_name=None))
        hlo[impl] = step.lower(state, batch, jax.random.key(1)).compile().as_text()
        # One step, crop + flip included: later steps amplify float differences (BatchNorm).
        state, metrics = step(state, batch, jax.random.key(1))
        results[impl] = (state.params, state.batch_stats, metrics)
    chex.assert_trees_all_close(results["onednn"], results["xla"], rtol=1e-4, atol=1e-5)
    # Every convolution of the step (3 forward, 2 backward each, bar the stem's input gradient)
    # is a oneDNN call, none is XLA's.
    assert " convolution(" not in hlo["onednn"]
    assert " convolution(" in hlo["xla"]
    calls = {
        name: hlo["onednn"].count(f'custom_call_target="salun_onednn_conv_{name}"')
        for name in ("forward", "input_grad", "weight_grad")
    }
    layers = 1 + 3 * 2 + 2  # ResNet-8: the stem, 2 per block, 2 shortcut convolutions
    assert calls == {"forward": layers, "input_grad": layers - 1, "weight_grad": layers}


@needs_onednn
def test_other_dtypes_fall_back_to_xla():
    # bfloat16 is not among the handlers' types: the layer keeps XLA's convolution.
    layer = onednn.Conv(4, (3, 3), dtype=jnp.bfloat16)
    x = jnp.ones((2, 6, 6, 3), jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    text = jax.jit(layer.apply).lower(variables, x).compile().as_text()
    assert "salun_onednn" not in text and " convolution(" in text


def test_missing_onednn_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_prefixes", lambda: [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"pip install -e \"\.\[cpu-onednn\]\""):
        onednn._find_onednn()
    monkeypatch.setattr(onednn, "_load", lambda: (False, "oneDNN not found (test)"))
    assert not onednn.available()
    assert onednn.unavailable_reason() == "oneDNN not found (test)"
    layer = onednn.Conv(4, (3, 3))
    with pytest.raises(RuntimeError, match=r"oneDNN convolutions cannot run here: oneDNN not"):
        layer.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
    with pytest.raises(RuntimeError, match="oneDNN convolutions cannot run here: oneDNN not"):
        onednn.load()
    with pytest.raises(RuntimeError, match="oneDNN convolutions cannot run here"):
        onednn.forward(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), (1, 1), ((1, 1),) * 2)


@needs_onednn
def test_build_is_cached_and_compiler_errors_are_reported(monkeypatch, tmp_path):
    first = onednn._build(str(tmp_path))
    mtime = (tmp_path / first).stat().st_mtime_ns
    assert onednn._build(str(tmp_path)) == first
    assert (tmp_path / first).stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails: a new cache entry, an error
    with pytest.raises(RuntimeError, match="compiling .*onednn_conv.cc failed"):
        onednn._build(str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler"):
        onednn._build(str(tmp_path))


@needs_onednn
def test_enable_loads_onednn_without_starting_the_backend():
    # Multi-process scripts initialise jax.distributed after the CPU options: enable() must not
    # start JAX's backend, even when it builds and registers oneDNN's handlers.
    script = (
        "import json, salun_jax.cpu as cpu\n"
        "from jax._src import xla_bridge\n"
        "from salun_jax.cpu import onednn\n"
        "from salun_jax.models import default_conv\n"
        "settings = cpu.enable(conv='onednn')\n"
        "print(json.dumps([settings['conv'], xla_bridge.backends_are_initialized(),\n"
        "                  default_conv() is onednn.Conv]))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    for name in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS"):  # the library's XLA settings
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["onednn", False, True]
