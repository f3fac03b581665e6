"""Every import in `salun_jax` points down the layering that docs/README.md documents: a module
imports from its own layer or below, never from a layer above it."""

import ast
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "salun_jax")


def _documented_layers() -> dict[str, int]:
    """{top-level module or package: layer} from the table in docs/README.md."""
    with open(os.path.join(REPO, "docs", "README.md")) as f:
        text = f.read()
    section = text[text.index("### Layers") :]
    layers = {}
    for number, modules in re.findall(r"^\| (\d) \| (.*?) \|$", section, re.M):
        for name in re.findall(r"`([a-z_]+)/?`", modules):
            layers[name] = int(number)
    return layers


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, top-level salun_jax module) of every salun_jax import in a file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "salun_jax":
                found += [(node.lineno, alias.name) for alias in node.names]
            elif node.module.startswith("salun_jax."):
                found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("salun_jax."):
                    found.append((node.lineno, alias.name.split(".")[1]))
    return found


def test_the_table_names_every_module_once():
    layers = _documented_layers()
    modules = {
        name[:-3] if name.endswith(".py") else name
        for name in os.listdir(PACKAGE)
        if not name.startswith("__")
        and (name.endswith(".py") or os.path.isdir(os.path.join(PACKAGE, name)))
        and name != "__pycache__"
    }
    assert modules == set(layers), modules ^ set(layers)


def test_every_import_points_down():
    layers = _documented_layers()
    upward = []
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py") or (root == PACKAGE and name == "__init__.py"):
                continue
            path = os.path.join(root, name)
            own = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
            for line, imported in _imports(path):
                if imported != own and layers[imported] > layers[own]:
                    upward.append(
                        f"{os.path.relpath(path, REPO)}:{line} ({own}, layer {layers[own]}) "
                        f"imports {imported} (layer {layers[imported]})"
                    )
    assert not upward, "\n".join(upward)


def test_no_function_outside_models_is_longer_than_100_lines():
    # Layers' code reads top to bottom; the models' setup methods are the one allowed exception.
    long = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] == "models":
            continue
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > 100:
                        long.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {node.name}")
    assert not long, "\n".join(long)


# Import the library (the pipelines and the command line too), build and train a model, save a
# checkpoint, evaluate it: with every subprocess the library starts recorded (git, for the code
# version, is fine; a C++ compiler is not).
_CORE_SCRIPT = """
import json, subprocess, sys
started = []
_popen_init = subprocess.Popen.__init__
def _recording_init(self, args, *a, **k):
    started.append([str(arg) for arg in (args if isinstance(args, (list, tuple)) else [args])])
    _popen_init(self, args, *a, **k)
subprocess.Popen.__init__ = _recording_init

import numpy as np
import salun_jax as sj
from salun_jax.pipeline import audit, classification, cli, diffusion, forgetting_quality, sd  # noqa

data = sj.load_dataset("digits")
split = sj.make_split(data.train_labels, data.test_labels, forget_fraction=0.1, seed=1)
model = sj.create_model("small_cnn", data.num_classes, data.mean, data.std, 0.25)
config = sj.TrainConfig(model="small_cnn", epochs=1, batch_size=256)
out = sj.train_classifier(data.train_images, data.train_labels, split.train, model, config,
                          workdir=sys.argv[1])
task = sj.UnlearnTask(model, data.train_images, data.train_labels, split, data.num_classes)
mask = sj.salun_mask(out.state, task, fraction=0.5, config=sj.UnlearnConfig(epochs=1))
metrics = sj.evaluate(out.state, task, data.test_images, data.test_labels)
print(json.dumps({"wing": sorted(m for m in sys.modules if m.startswith("salun_jax.cpu")),
                  "conv": type(model.conv).__name__ + ":" + getattr(model.conv, "__name__", ""),
                  "started": started, "TA": metrics["TA"]}))
"""


def test_the_library_runs_without_the_cpu_wing(tmp_path, fast_compile_xla_flags):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop("SALUN_JAX_CONV_IMPL", None)
    env["XLA_FLAGS"] = fast_compile_xla_flags  # not the wing's YNNPACK flag
    out = subprocess.run(
        [sys.executable, "-c", _CORE_SCRIPT, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wing"] == [], "salun_jax.cpu was imported"
    assert result["conv"] == "type:Conv"  # plain nn.Conv
    compilers = ("c++", "g++", "gcc", "cc", "clang", "clang++", os.environ.get("CXX", "c++"))
    assert not [args for args in result["started"] if os.path.basename(args[0]) in compilers]
    assert result["TA"] > 0


def test_importing_the_package_is_light_and_every_api_name_resolves():
    # `import salun_jax` (and so every script's --help) loads no JAX; each public name still
    # resolves on first use, `sj.unlearn` is the function and submodules stay reachable.
    code = (
        "import sys, types, salun_jax as sj\n"
        "light = 'jax' not in sys.modules\n"
        "names = {n: type(getattr(sj, n)).__name__ for n in sj.__all__}\n"
        "print(light, callable(sj.unlearn), isinstance(sj.unlearn, types.ModuleType),\n"
        "      isinstance(sj.saliency, types.ModuleType), len(names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    import salun_jax

    expected = f"True True False True {len(salun_jax.__all__)}"
    assert result.stdout.split("\n")[0] == expected, result.stdout
