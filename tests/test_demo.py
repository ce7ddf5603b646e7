"""`mrsfm demo` as a user runs it from an installed wheel, in a folder that is not the checkout:
continued federated pretraining from the shipped model on loopback, then the fine-tune table; its
loss must fall and its table must carry every arm. The same wheel runs the site launcher.

The wheel goes into a fresh virtual environment whose third-party packages (torch, flwr, ...) are
this environment's, reached through a .pth file (no second 6 GB install); mrsfm itself, its
configs, examples and the Flower app manifest come only from the wheel (asserted)."""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow
FLOWER_SCRIPTS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                  "flwr-clientapp", "flwr-simulation")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv with the wheel of this checkout installed, and a working folder outside the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a clean copy: no stale build/ of an earlier layout can slip into the wheel
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (root / "dist").glob("mrsfm-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # torch, flwr, ... (not mrsfm)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    for name in FLOWER_SCRIPTS:  # Flower's console scripts, as `pip install mrsfm` would have put them here
        src = Path(sys.executable).parent / name
        lines = src.read_text().splitlines()
        (venv / "bin" / name).write_text("\n".join([f"#!{py}", *lines[1:]]) + "\n")
        (venv / "bin" / name).chmod(0o755)
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MRSFM_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {"venv": venv, "py": py, "work": work, "env": env}


def _run(installed: dict, *cmd: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=installed["work"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout_s)


def test_the_wheel_carries_the_package_its_configs_and_examples(installed):
    res = _run(installed, str(installed["py"]), "-c",
               "import mrsfm_model, server, client; from mrsfm_model.config import config_dir; "
               "from server.bundle import app_manifest; from server.example_sites import SHIPPED_INVIVO; "
               "print(mrsfm_model.__file__, config_dir(), SHIPPED_INVIVO, app_manifest(), sep='\\n')")
    assert res.returncode == 0, res.stderr
    for line in res.stdout.split():
        assert Path(line).exists() and Path(line).is_relative_to(installed["venv"]), line  # nothing from the checkout


def test_the_site_launcher_runs_from_the_wheel(installed):
    with socket.socket() as lab:  # a port that answers, standing in for the lab's SuperLink
        lab.bind(("127.0.0.1", 0))
        lab.listen()
        res = _run(installed, str(installed["py"]), "-m", "client", "--site", "unicamp", "--dry-run",
                   f"site.superlink=127.0.0.1:{lab.getsockname()[1]}")
    assert res.returncode == 0, res.stderr
    assert "flower-supernode" in res.stdout and 'site="unicamp"' in res.stdout and 'log-level="INFO"' in res.stdout


def test_demo_learns_from_the_shipped_model_and_reports_every_arm(installed):
    out = installed["work"] / "demo"
    res = _run(installed, str(installed["venv"] / "bin" / "mrsfm"), "demo", "--out", "demo", timeout_s=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["init"] == "shipped"
    assert summary["final_loss"] <= 0.9 * summary["first_loss"], summary  # at least 10 % lower over the rounds
    server_log = (out / "logs" / "flwr_run.log").read_text()
    assert "round 1 starts from" in server_log and "mrsfm_micro.mae.safetensors" in server_log
    result = json.loads((out / "finetune.json").read_text())
    arms = {(r["init"], r["mode"]) for r in result["rows"]}
    assert {("pretrained", "full"), ("random_init", "full"), ("scratch", "full"),
            ("baseline", "spectrum"), ("baseline", "pixels")} <= arms
    assert {p["minus"] for p in result["paired"]} >= {"random_init full", "scratch full", "baseline pixels"}
    for name in ("training_curve.png", "reconstruction.png", "finetune.png", "summary.json"):
        assert (out / name).is_file(), name
