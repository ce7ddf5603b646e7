"""deploy/ONBOARDING.md, run as written: the shell commands of the guide's code blocks that a site's
admin types on the path without containers or systemd (key pair, installing the key and the lab's
certificate, the site's config folder, the service's env file, the dry run as the service's user)
run here in order, in a temporary root standing in for /, so that the guide cannot drift from the
code. What needs the network, root's services or a package index (tar of the bundle, pip, docker,
systemctl, useradd, chgrp to a user this machine lacks) is left out; the parsers in
test_deploy_kit.py check the container and systemd words."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import INVIVO, REPO

from server import pki

GUIDE = REPO / "deploy" / "ONBOARDING.md"
SITE = "unicamp"
ROOTS = ("/opt/mrsfm", "/etc/mrsfm", "/data/mrs", "/var/lib/mrsfm")  # the guide's absolute paths
RUNS = ("-m server.pki site", "install ", "mkdir ", "cp ", "echo ", "-m client")  # what runs in a test
SKIPS = ("/etc/systemd", "tar ", "python3.11 -m venv", "pip install", "docker", "systemctl", "useradd", "chgrp", "chmod", "sha256sum")


def guide_commands(text: str) -> list[str]:
    """Every command of the guide's ```bash blocks (indented ones too), continuations joined, comments cut."""
    out = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def localize(cmd: str, root: Path, superlink: str) -> str:
    """The guide's words, with / moved to `root`, the site named, sudo and the service user dropped
    (the test runs as itself), the venv's python being this one and the lab a local listener."""
    cmd = cmd.replace("<site>", SITE).replace("lab.example.org:8000", superlink)
    cmd = re.sub(r"\bsudo -u mrsfm ", "", cmd)
    cmd = re.sub(r"\bsudo ", "", cmd).replace(" -o mrsfm", "")
    cmd = cmd.replace("/opt/mrsfm/.venv/bin/python", sys.executable)
    for path in ROOTS:
        cmd = re.sub(rf"(?<![\w/.]){re.escape(path)}", str(root) + path, cmd)
    return cmd


def runnable(cmd: str) -> bool:
    return any(k in cmd for k in RUNS) and not any(k in cmd for k in SKIPS)


@pytest.fixture()
def superlink():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_the_guide_holds_the_steps_a_site_needs():
    cmds = [c for c in guide_commands(GUIDE.read_text()) if runnable(c)]
    for step in ("-m server.pki site <site>", "/etc/mrsfm/configs", "install -m 400", "install -m 644 ca.crt",
                 "-m client --site <site> --dry-run"):
        assert any(step in c for c in cmds), f"the guide lost the step {step!r}"
    assert any("--require-hashes" in c and "--no-index" in c for c in guide_commands(GUIDE.read_text()))


@pytest.mark.slow  # the real site launcher's dry run
def test_the_guide_runs_as_written_for_a_site_without_containers(tmp_path, superlink):
    root, admin = tmp_path / "root", tmp_path / "admin"
    admin.mkdir()
    # what the site has before it starts: the release's kit in /opt/mrsfm (from the bundle), its spectra,
    # the lab's ca.crt in the admin's folder (sent by the lab)
    shutil.copytree(REPO / "configs", root / "opt/mrsfm/configs")
    shutil.copytree(INVIVO / "philips", root / "data/mrs")
    assert pki.main(["ca", "--out", str(tmp_path / "lab")]) == 0
    shutil.copy(tmp_path / "lab" / "ca.crt", admin / "ca.crt")

    ran = []
    for cmd in guide_commands(GUIDE.read_text()):
        if not runnable(cmd):
            continue
        local = localize(cmd, root, superlink)
        res = subprocess.run(local, shell=True, cwd=admin, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"the guide's `{cmd}` failed here:\n{local}\n{res.stderr.strip()[-800:]}"
        ran.append((cmd, res))
    dry = [res for cmd, res in ran if "--dry-run" in cmd]
    assert dry, "no dry run in the guide"
    supernode = shlex.split(dry[-1].stdout.strip().splitlines()[-2])
    assert supernode[0] == "flower-supernode" and "--insecure" not in supernode
    flags = dict(zip(supernode, supernode[1:]))
    assert flags["--auth-supernode-private-key"] == str(root / f"etc/mrsfm/{SITE}.key")
    assert flags["--root-certificates"] == str(root / "etc/mrsfm/ca.crt")
    assert f'data-dir="{root / "data/mrs"}"' in flags["--node-config"]
    key = root / f"etc/mrsfm/{SITE}.key"
    assert key.stat().st_mode & 0o777 == 0o400 and (admin / "pki/sites" / f"{SITE}.pub").is_file()
    assert (root / "etc/mrsfm/configs/site" / f"{SITE}.yaml").is_file()
