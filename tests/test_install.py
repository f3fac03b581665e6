"""The install lines' requirement sets, offline (static facts; pip's resolver over the network is
scripts/check_install_lines.py's job)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pins requirements.txt may hold beyond requirements/common.txt: the CPU jax and the test tools.
# A runtime pin belongs in common.txt, where the CUDA 12 and TPU sets get it too.
CPU_ONLY = {"jax", "jaxlib"}
# What requirements/cpu-onednn.txt adds to requirements.txt: the CPU wing's oneDNN.
ONEDNN = {"onednn-cpu-gomp", "onednn-devel-cpu-gomp"}
TEST_TOOLS = {"pytest", "pytest-xdist", "execnet", "ruff"}


def _load_script():
    path = os.path.join(ROOT, "scripts", "check_install_lines.py")
    spec = importlib.util.spec_from_file_location("check_install_lines", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _pins(relative: str) -> dict[str, object]:
    """{canonical name: Requirement} of a requirement file (includes followed)."""
    found = {}
    for requirement, source in script.read_requirements(os.path.join(ROOT, relative)):
        name = canonicalize_name(requirement.name)
        assert name not in found, f"{name} twice (again in {source})"
        found[name] = requirement
    return found


def _version(requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not an exact pin"
    return spec.version


def test_every_set_parses_and_pins_exactly():
    for line in script.INSTALL_LINES:
        pins = _pins(line.requirements)
        assert pins, line.requirements
        for requirement in pins.values():
            _version(requirement)


def test_cpu_set_is_common_plus_cpu_only_pins():
    cpu, common = _pins("requirements.txt"), _pins("requirements/common.txt")
    assert {name: str(req) for name, req in common.items()} == {
        name: str(cpu[name]) for name in common
    }
    extra = set(cpu) - set(common)
    assert extra <= CPU_ONLY | TEST_TOOLS, (
        f"{sorted(extra - CPU_ONLY - TEST_TOOLS)} only in requirements.txt: runtime pins go in "
        "requirements/common.txt (the CUDA 12 and TPU sets include it)"
    )
    assert _version(cpu["jax"]) == _version(cpu["jaxlib"])


@pytest.mark.parametrize("name, extra", [("cuda12", "cuda12"), ("tpu", "tpu")])
def test_accelerator_sets_have_no_cpu_only_pin(name, extra):
    line = next(line for line in script.INSTALL_LINES if line.name == name)
    pins, common = _pins(line.requirements), _pins("requirements/common.txt")
    assert set(pins) - set(common) == {"jax"}
    assert not (set(pins) & (CPU_ONLY - {"jax"} | ONEDNN | TEST_TOOLS))
    jax = pins["jax"]
    assert jax.extras == {extra}
    assert _version(jax) == _version(_pins("requirements.txt")["jax"])


def test_setup_requirements_admit_the_pins():
    pins = _pins("requirements.txt")
    for extra in (None, "cuda12", "tpu"):
        for text in script.setup_requirements(extra):
            requirement = script.Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"setup.py requires {name}, which requirements/ does not pin"
            assert SpecifierSet(str(requirement.specifier)).contains(_version(pins[name])), text
            if extra:
                assert requirement.extras <= {extra}


def test_readme_install_section_shows_every_line():
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    section = re.search(r"^## Install\n(.*?)^## ", readme, re.S | re.M).group(1)
    for line in script.INSTALL_LINES:
        assert line.command in section, line.command


def test_onednn_is_an_extra_not_a_default():
    cpu, onednn = _pins("requirements.txt"), _pins("requirements/cpu-onednn.txt")
    assert not set(cpu) & ONEDNN  # the default install compiles and downloads nothing for it
    assert set(onednn) - set(cpu) == ONEDNN
    assert {name: str(onednn[name]) for name in cpu} == {name: str(r) for name, r in cpu.items()}
    extra = {
        canonicalize_name(script.Requirement(text).name): script.Requirement(text)
        for text in script.setup_requirements("cpu-onednn")
    }
    for name in ONEDNN:
        assert SpecifierSet(str(extra[name].specifier)).contains(_version(onednn[name])), name
        assert str(extra[name].marker) == str(onednn[name].marker), name
