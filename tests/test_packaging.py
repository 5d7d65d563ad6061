"""What a package index and a user of the sdist get: the metadata, the licence, py.typed,
an sdist whose tests run once unpacked, and a clear error on a system other than Linux."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import taskpool

from harness import ROOT

# What the tests need beside tests/test_*.py (an sdist shipped only those before).
TEST_SUPPORT = ["tests/conftest.py", "tests/harness.py", "tests/executor_jobs.py"]


def _build_sdist(out: Path) -> Path:
    """The sdist of a clean copy of the tree (the egg-info of the development install lists
    files that a fresh clone's sdist would not have), built by the venv's own setuptools, as
    `python -m build --sdist` does in an isolated environment (which needs the index)."""
    clean = out.parent / "clean"
    shutil.copytree(ROOT, clean, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "__pycache__", ".*_cache", "build", "dist"))
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys; from setuptools import build_meta; "
         "print(build_meta.build_sdist(sys.argv[1]))", str(out)],
        cwd=clean, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_the_sdist_carries_its_metadata_licence_and_what_its_tests_need(
        tmp_path: Path) -> None:
    sdist = _build_sdist(tmp_path / "dist")
    top = f"taskpool-{taskpool.__version__}"
    assert sdist.name == f"{top}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        if hasattr(tarfile, "data_filter"):  # 3.9.17+: an sdist holds plain files only
            tar.extractall(tmp_path / "unpacked", filter="data")
        else:
            tar.extractall(tmp_path / "unpacked")
    tests = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").glob("*.py")}
    for needed in [*TEST_SUPPORT, *tests, "LICENSE", "README.md", "pyproject.toml",
                   "taskpool/py.typed", "taskpool/__init__.py"]:
        assert f"{top}/{needed}" in names, needed
    unpacked = tmp_path / "unpacked" / top
    info = email.message_from_string((unpacked / "PKG-INFO").read_text())
    assert info["License-Expression"] == "MIT"
    assert info["License-File"] == "LICENSE"
    assert "Operating System :: POSIX :: Linux" in info.get_all("Classifier")
    assert "Typing :: Typed" in info.get_all("Classifier")
    assert not info.get_all("Project-URL")  # none rather than placeholders
    assert "MIT License" in (unpacked / "LICENSE").read_text()

    # Its tests run from the unpacked sdist, on its own copy of the package. A few quick
    # ones (the whole suite is `make test`'s): README's links and options against its tree.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_readme.py", "tests/test_packaging.py::"
         "test_the_package_in_use_is_the_one_under_test"],
        cwd=unpacked, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_the_package_in_use_is_the_one_under_test() -> None:
    """From the unpacked sdist, its own taskpool, not the one installed for development."""
    assert Path(taskpool.__file__).resolve().parent.parent == ROOT


def test_importing_taskpool_elsewhere_than_linux_is_a_clear_import_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.platform = 'darwin'; import taskpool"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        "ImportError: taskpool runs on Linux only (this is darwin): it is built on Linux's "
        "POSIX message queues, fork() and prctl()")


def test_the_container_check_is_the_projects_own_script() -> None:
    """`make container-test` works from a fresh clone: it runs a script of the project (not
    a tool beside it), which takes the base image as an argument and refuses what it does
    not know. (CI runs the check itself: .ci/run.)"""
    recipe = subprocess.run(["make", "-s", "-n", "--no-print-directory", "container-test"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.split()
    assert recipe[0] == "tools/container-check"
    script = ROOT / recipe[0]
    assert script.is_file() and os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], timeout=60).returncode == 0
    assert "ARG BASE_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    assert "--base-image" in script.read_text()
    wrong = subprocess.run([str(script), "--bogus"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and wrong.stderr.startswith("usage: ")
