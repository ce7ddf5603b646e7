"""The offline bundle's lock (deploy/requirements.lock): every runtime dependency pinned with its
hashes, so that `pip install --no-index --find-links WHEELHOUSE --require-hashes -r` installs the
same versions at every site, and the image is built from it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution

import pytest
from helpers import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = REPO / "deploy" / "requirements.lock"
# the sites' interpreter and platform (the image's python:3.11, Linux x86_64): what the lock is for
SITE_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def read_lock(text: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, sha256 hashes), as pip's hash-checking mode reads the file."""
    out = {}
    for block in re.split(r"\n(?=\S)", re.sub(r"(?m)^\s*#.*\n?", "", text)):
        words = block.replace("\\\n", " ").split()
        if not words:
            continue
        req = Requirement(words[0])
        (spec,) = req.specifier  # exactly one ==
        assert spec.operator == "==", f"{words[0]}: not pinned with =="
        hashes = [w.split("sha256:", 1)[1] for w in words[1:] if w.startswith("--hash=sha256:")]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), words[0]
        out[canonicalize_name(req.name)] = (Version(spec.version), hashes)
    return out


@pytest.fixture(scope="module")
def lock() -> dict[str, tuple[Version, list[str]]]:
    return read_lock(LOCK.read_text())


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def test_the_lock_pins_every_runtime_dependency_with_a_hash(lock):
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} (pyproject.toml) is not in {LOCK.name}: run deploy/offline.sh lock"
        version, hashes = lock[name]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {req}"
        assert hashes, f"{name}: no --hash, so pip --require-hashes refuses the whole file"
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    # what two sites must share to train the same model: one version each, no range
    assert {"torch", "timm", "opacus", "flwr", "numpy"} <= set(lock)


def test_the_lock_holds_every_dependency_of_what_it_locks(lock):
    """pip --require-hashes refuses to install a dependency the file does not name: the lock is
    closed under the requirements of its packages, as far as the installed copies here tell (those
    at the locked version; markers evaluated for the sites' Python 3.11 on Linux)."""
    checked, missing = 0, []
    for name, (version, _) in lock.items():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if Version(dist.version) != version:
            continue
        checked += 1
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**SITE_ENV, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in lock:
                missing.append(f"{name} needs {req}")
            elif not req.specifier.contains(lock[dep][0], prereleases=True):
                missing.append(f"{name} needs {req}, the lock has {lock[dep][0]}")
    assert checked >= len(lock) // 2, f"only {checked} of {len(lock)} locked packages installed here to check"
    assert not missing, missing


def test_the_lock_is_what_the_tests_here_run(lock):
    """The suite's torch, timm, opacus and flwr are the locked ones: what the sites install is what
    was tested (a newer library here means: re-make the lock and test again)."""
    for name in ("torch", "timm", "opacus", "flwr"):
        installed = Version(distribution(name).version)
        assert Version(installed.base_version) == lock[name][0], f"{name} {installed} here, {lock[name][0]} locked"


def test_a_lock_without_hashes_or_pins_is_caught():
    with pytest.raises(AssertionError, match="not pinned"):
        read_lock("torch>=2.4 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    assert read_lock("timm==1.0.31\n    # via mrsfm\n") == {"timm": (Version("1.0.31"), [])}
