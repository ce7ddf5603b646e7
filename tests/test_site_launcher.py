"""The site launcher's checks an IT admin meets first: a site file that names another hospital, a
dry run beside the running service, and a GPU that was asked for but is not there."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
from helpers import REPO

from client.__main__ import SiteError, check_device


def _launch(config_dir, *words: str) -> subprocess.CompletedProcess:
    env = {"MRSFM_CONFIG_DIR": str(config_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "client", *words], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


@pytest.fixture
def configs(tmp_path):
    dst = tmp_path / "configs"
    shutil.copytree(REPO / "configs", dst)
    return dst


@pytest.fixture
def superlink():
    """A plain TCP listener standing in for the SuperLink (the launcher only checks it answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_copied_site_file_that_names_another_hospital_is_refused(configs, superlink):
    shutil.copy(configs / "site" / "unicamp.yaml", configs / "site" / "sirio.yaml")
    res = _launch(configs, "--site", "sirio", "--dry-run", f"site.superlink={superlink}", "site.insecure=true")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "configs/site/sirio.yaml says name: unicamp" in lines[0]
    text = (configs / "site" / "sirio.yaml").read_text().replace("name: unicamp", "name: sirio")
    (configs / "site" / "sirio.yaml").write_text(text)
    ok = _launch(configs, "--site", "sirio", "--dry-run", f"site.superlink={superlink}", "site.insecure=true",
                 "site.runtime_port=0", "site.data_dir=null")
    assert ok.returncode == 0, ok.stderr
    assert 'site="sirio"' in ok.stdout  # the identity the server will record


def test_the_dry_run_works_beside_a_running_service(configs, superlink):
    with socket.socket() as busy:  # the running SuperNode's runtime port
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        words = [f"site.superlink={superlink}", "site.insecure=true", f"site.runtime_port={port}", "site.data_dir=null"]
        dry = _launch(configs, "--site", "unicamp", "--dry-run", *words)
        assert dry.returncode == 0, dry.stderr
        assert f"site.runtime_port {port} is in use" in dry.stderr and "dry run does not need" in dry.stderr
        assert "flower-supernode" in dry.stdout
        real = _launch(configs, "--site", "unicamp", *words)  # the real start still refuses, in one line
        assert real.returncode == 2 and f"site.runtime_port {port} is in use" in real.stderr


def test_a_gpu_asked_for_but_not_visible_is_one_line_not_a_cpu_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SiteError, match="site.device is cuda:0 but no such GPU is visible"):
        check_device("cuda:0")
    assert check_device("cpu") == "cpu"
    assert "no GPU visible, training on the CPU" in check_device("auto")


def test_the_release_identity_is_printed_for_the_lab_to_compare(configs):
    res = _launch(configs, "--version")
    assert res.returncode == 0
    line = res.stdout.strip()
    assert line.startswith("mrsfm 0.1.0") and ("commit " in line or "no git commit" in line)
