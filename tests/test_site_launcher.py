"""The site launcher's checks an IT admin meets first: a site file that names another hospital, a
dry run beside the running service, and a GPU that was asked for but is not there."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INVIVO, REPO

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


# -- the site's own config folder (MRSFM_CONFIG_DIR), the data folder, simulation only -------------
def test_a_site_added_in_its_own_config_folder_needs_no_new_installation(configs, superlink):
    """The kit mounts /etc/mrsfm/configs (MRSFM_CONFIG_DIR): a new site file there is all a site adds;
    a folder that is not this release's shared configs is refused in one line naming the files."""
    text = (configs / "site" / "unicamp.yaml").read_text().replace("name: unicamp", "name: sirio")
    (configs / "site" / "sirio.yaml").write_text(text.replace("overrides:\n", "overrides:\n  - privacy.enabled=true\n"))
    words = ["--dry-run", f"site.superlink={superlink}", "site.insecure=true", "site.runtime_port=0"]
    ok = _launch(configs, "--site", "sirio", *words, f"site.data_dir={INVIVO / 'philips'}")
    assert ok.returncode == 0, ok.stderr
    assert 'site="sirio"' in ok.stdout and "privacy.enabled=true" in ok.stdout  # where a site sets its privacy

    (configs / "model" / "micro.yaml").write_text((configs / "model" / "micro.yaml").read_text() + "\nextra: 1\n")
    stale = _launch(configs, "--site", "sirio", *words)
    lines = stale.stderr.strip().splitlines()
    assert stale.returncode == 2 and len(lines) == 1, stale.stderr
    assert f"MRSFM_CONFIG_DIR={configs} is not this release's configs: model/micro.yaml differ" in lines[0]
    empty = configs.parent / "empty"
    empty.mkdir()
    res = _launch(empty, "--site", "sirio", *words)
    assert res.returncode == 2 and f"MRSFM_CONFIG_DIR={empty} holds no config.yaml" in res.stderr


def test_a_missing_or_empty_data_folder_is_one_line_naming_it(configs, superlink, tmp_path):
    words = ["--site", "unicamp", "--dry-run", f"site.superlink={superlink}", "site.insecure=true",
             "site.runtime_port=0"]
    missing = tmp_path / "mrs"
    res = _launch(configs, *words, f"site.data_dir={missing}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"site.data_dir {missing} does not exist" in res.stderr and "simulation_only: true" in res.stderr
    missing.mkdir()
    res = _launch(configs, *words, f"site.data_dir={missing}")
    assert res.returncode == 2 and "no usable spectra" in res.stderr and "simulation_only: true" in res.stderr


def _as_user(uid: int, fn):
    """fn() in a forked child running as uid (no exec): its SiteError text, '' when it passed."""
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        msg = b""
        try:
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except SiteError as exc:
            msg = str(exc).encode() or b"?"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised in the fork
            msg = f"unexpected {type(exc).__name__}: {exc}".encode()
        finally:
            os.write(write, msg)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_a_data_folder_the_service_user_cannot_read_is_one_line_naming_owner_and_mode(tmp_path):
    """The container's user (uid 10001) or the unit's (mrsfm) must read the spectra: said up front,
    with the folder, its owner and mode, and the fix, instead of every file failing to load."""
    import os
    import tempfile

    from client.__main__ import check_data_access

    with tempfile.TemporaryDirectory() as top:  # under /tmp, open to every user as /data is
        Path(top).chmod(0o755)
        data = Path(top) / "mrs"
        shutil.copytree(INVIVO / "philips", data)
        data.chmod(0o700)
        uid = 10001 if os.geteuid() == 0 else None  # root reads everything: check as the image's user
        run = (lambda fn: _as_user(uid, fn)) if uid else (lambda fn: _message(fn))
        why = run(lambda: check_data_access(data))
        assert f"site.data_dir {data} cannot be read by user" in why and "mode 0700" in why
        assert f"chmod -R g+rX {data}" in why
        data.chmod(0o755)
        inner = sorted(data.iterdir())[0]
        inner.chmod(0o600)

        def one_file_denied():
            denied = check_data_access(data)
            if denied != [inner]:
                raise SiteError(f"denied {denied}")

        assert run(one_file_denied) == ""
        inner.chmod(0o644)

        def none_denied():
            if denied := check_data_access(data):
                raise SiteError(f"denied {denied}")

        assert run(none_denied) == ""


def _message(fn) -> str:
    try:
        fn()
    except SiteError as exc:
        return str(exc)
    return ""


def test_simulation_only_is_explicit_loud_and_reads_no_folder(configs, superlink, tmp_path):
    words = ["--site", "unicamp", "--dry-run", f"site.superlink={superlink}", "site.insecure=true",
             "site.runtime_port=0", f"site.data_dir={tmp_path / 'not-yet'}"]
    res = _launch(configs, *words, "site.simulation_only=true")
    assert res.returncode == 0, res.stderr
    assert "WARNING: simulation only: no in vivo spectra (site.simulation_only is true" in res.stderr
    assert 'data-dir=""' in res.stdout  # the ClientApp reads nothing
    res = _launch(configs, *words, "site.simulation_only=true", "privacy.enabled=true")
    assert res.returncode == 2 and "privacy.enabled is true but this site has no in vivo spectra" in res.stderr
    res = _launch(configs, *words, "site.simulation_only=yes")
    assert res.returncode == 2 and "site.simulation_only must be true or false" in res.stderr
    res = _launch(configs, *words[:-1], f"site.data_dir={INVIVO / 'philips'}")
    assert res.returncode == 0 and "simulation only" not in res.stderr, res.stderr
