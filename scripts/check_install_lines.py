"""Checks each documented install line's requirement set with pip's resolver (needs PyPI).

    python3 scripts/check_install_lines.py                # every line, every target
    python3 scripts/check_install_lines.py cuda12 tpu     # some lines

For each line of README.md's Install section and each target Python, runs
`pip install --dry-run --ignore-installed --report FILE -r <the line's requirement file>
-r <setup.py's install_requires and the line's extra>`, i.e. both commands of the line in one
resolution, and reads the report. A target other than this interpreter (the CUDA 12 and TPU
wheels do not install here) adds `--python-version X --only-binary=:all: --platform
manylinux_2_*_x86_64 ... --target <scratch>` (pip 23 takes platform options only with --target;
--dry-run installs nothing) and `--use-feature=fast-deps`, which reads wheel metadata by HTTP
range requests instead of downloading ~3 GB of CUDA wheels. Binary-only resolution cannot build
an sdist, so the sdist-only dependencies (tensorflow-datasets' `promise`) are built into a
scratch wheel folder first, as pip would build them on the target.

Runs 3 resolutions at a time (--jobs). Prints OK or FAIL per line and target, with the resolved
jax stack and the checks of the set (CPU: the CPU jaxlib, no CUDA plugin, libtpu or oneDNN;
CUDA 12: the plugin at jax's version, no oneDNN; TPU: libtpu, no oneDNN). Exit status 1 if any
fails. The offline facts (files parse, pins agree, no CPU-only pin in the accelerator sets) are
tests/test_install.py's.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class InstallLine:
    name: str
    title: str
    requirements: str  # relative to the repository root
    extra: str | None  # setup.py extra the line stands for (checked with install_requires)
    targets: tuple[str, ...]  # "native" (this interpreter) or a Python version "3.12"
    must_have: tuple[str, ...]  # package names the resolved set must hold
    must_not_have: tuple[str, ...]  # ... and must not (prefix match)

    @property
    def command(self) -> str:
        return f"python3 -m pip install -r {self.requirements} && python3 -m pip install -e ."


INSTALL_LINES = (
    InstallLine(
        "cpu",
        "CPU",
        "requirements.txt",
        None,
        ("native", "3.12"),
        ("jax", "jaxlib"),
        ("jax-cuda", "libtpu", "onednn"),  # oneDNN is the cpu-onednn extra's
    ),
    InstallLine(
        "cuda12",
        "CUDA 12",
        "requirements/cuda12.txt",
        "cuda12",
        ("3.11", "3.12"),
        ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"),
        ("onednn", "libtpu", "pytest", "ruff"),
    ),
    InstallLine(
        "tpu",
        "TPU",
        "requirements/tpu.txt",
        "tpu",
        ("3.11", "3.12"),
        ("jax", "jaxlib", "libtpu"),
        ("onednn", "jax-cuda", "pytest", "ruff"),
    ),
)
# Shown after OK: the versions pip chose for these.
STACK = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu", "nvidia-cudnn-cu12")
# Dependencies published only as an sdist (binary-only resolution needs their wheel built).
SDIST_ONLY = ("promise",)
# Target glibc of the cross checks: manylinux_2_5 .. 2_35 (Ubuntu 22.04, as GPU/TPU VM images).
GLIBC_MINOR = 35


# Reading the requirement files (also used by tests/test_install.py, offline).


def read_requirements(path: str) -> list[tuple[Requirement, str]]:
    """(requirement, file it is in) of a requirement file, following `-r` includes (relative to
    the including file, as pip reads them). Raises ValueError on a line pip options other than
    `-r` or a requirement that does not parse."""
    found = []
    with open(path) as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("-r "):
                include = os.path.join(os.path.dirname(path), line[3:].strip())
                found.extend(read_requirements(include))
                continue
            if line.startswith("-"):
                raise ValueError(f"{path}:{number}: unexpected option {line!r}")
            try:
                found.append((Requirement(line), path))
            except Exception as error:
                raise ValueError(f"{path}:{number}: {error}") from error
    return found


def setup_requirements(extra: str | None = None) -> list[str]:
    """setup.py's install_requires, plus `extras_require[extra]` (read with ast: no build)."""
    with open(os.path.join(ROOT, "setup.py")) as handle:
        tree = ast.parse(handle.read())
    keywords = {
        keyword.arg: keyword.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
        for keyword in node.keywords
    }
    requires = list(ast.literal_eval(keywords["install_requires"]))
    if extra is not None:
        requires += ast.literal_eval(keywords["extras_require"])[extra]
    return requires


# Resolving.


def _platforms() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _build_sdist_wheels(folder: str) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder]
    subprocess.run([*command, *SDIST_ONLY], check=True, capture_output=True, text=True)


def resolve(line: InstallLine, target: str, scratch: str) -> tuple[dict[str, str], str, float]:
    """{name: version} pip resolves for `line` on `target`, the error text ("" if none) and the
    seconds it took."""
    start = time.perf_counter()
    extra_file = os.path.join(scratch, f"setup-{line.name}-{target}.txt")
    with open(extra_file, "w") as handle:
        handle.write("\n".join(setup_requirements(line.extra)) + "\n")
    report = os.path.join(scratch, f"report-{line.name}-{target}.json")
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    command += ["--report", report, "-r", os.path.join(ROOT, line.requirements), "-r", extra_file]
    if target != "native":
        command += ["--python-version", target, "--only-binary=:all:", "--use-feature=fast-deps"]
        command += ["--target", os.path.join(scratch, f"target-{line.name}-{target}")]
        command += ["--find-links", os.path.join(scratch, "wheels")]
        for platform in _platforms():
            command += ["--platform", platform]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        errors = [text for text in result.stderr.splitlines() if not text.startswith("WARNING")]
        error = "\n".join(errors[-12:]) or f"pip exited {result.returncode}"
        return {}, error, time.perf_counter() - start
    with open(report) as handle:
        installs = json.load(handle)["install"]
    names = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in installs
    }
    return names, "", time.perf_counter() - start


def check_set(line: InstallLine, names: dict[str, str]) -> list[str]:
    """What is wrong with a resolved set (empty: nothing)."""
    problems = [f"missing {name}" for name in line.must_have if name not in names]
    problems += [
        f"has {name}" for name in names for bad in line.must_not_have if name.startswith(bad)
    ]
    jax = names.get("jax")
    for name in ("jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt"):
        if name in names and names[name] != jax:
            problems.append(f"{name} {names[name]} is not jax's {jax}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = [line.name for line in INSTALL_LINES]
    parser.add_argument("lines", nargs="*", help=f"some of {known} (default: all)")
    parser.add_argument("--jobs", type=int, default=3, help="resolutions run at once")
    args = parser.parse_args()
    if set(args.lines) - set(known):
        parser.error(f"unknown lines {sorted(set(args.lines) - set(known))}; known: {known}")
    chosen = [line for line in INSTALL_LINES if not args.lines or line.name in args.lines]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"pip resolver check of the install lines (this interpreter: Python {here})")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="check_install_") as scratch:
        if any(target != "native" for line in chosen for target in line.targets):
            _build_sdist_wheels(os.path.join(scratch, "wheels"))
        jobs = [(line, target) for line in chosen for target in line.targets]
        with ThreadPoolExecutor(args.jobs) as pool:  # pip runs in subprocesses, mostly waiting
            results = pool.map(lambda job: resolve(*job, scratch), jobs)
            for (line, target), (names, error, seconds) in zip(jobs, results, strict=True):
                if target == line.targets[0]:
                    print(f"\n{line.title}: {line.command}")
                where = f"py{here} here" if target == "native" else f"py{target} manylinux x86_64"
                problems = check_set(line, names) if not error else [error]
                if problems:
                    failed += 1
                    print(f"  FAIL {where} ({seconds:.0f} s):")
                    print("\n".join("       " + text for text in "\n".join(problems).split("\n")))
                    continue
                stack = ", ".join(f"{name} {names[name]}" for name in STACK if name in names)
                print(f"  OK   {where} ({seconds:.0f} s): {len(names)} packages; {stack}")
    print(f"\n{'all OK' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
