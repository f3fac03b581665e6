"""Every import in `salun_jax` points down the layering that docs/README.md documents: a module
imports from its own layer or below, never from a layer above it."""

import ast
import os
import re

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
