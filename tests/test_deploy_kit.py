"""The deployment kit in deploy/ agrees with itself and with the programs it starts.

No Docker engine or systemd here: the compose files and units are parsed, and every command
they hold is checked against the real programs: flower-superlink's and flower-supernode's own
argument parsers, and the site launcher `python -m client --dry-run` with the kit's words (its
paths moved into a temporary folder, a plain TCP listener standing in for the SuperLink).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import INVIVO, REPO

from server import pki

DEPLOY = REPO / "deploy"
SITE_ENV = {"MRSFM_SITE": "unicamp", "MRSFM_SUPERLINK": "lab.example.org:8000", "MRSFM_DATA": "/data/mrs"}
TLS_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
PKI_FILES = {"--ssl-ca-certfile": "ca.crt", "--ssl-certfile": "superlink.crt", "--ssl-keyfile": "superlink.key"}


# -- reading the kit -------------------------------------------------------------------------------
def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error} (and $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value).replace("$$", "$")


def compose(name: str, env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((DEPLOY / name).read_text()), env or {})


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume; mode 'rw' unless ':ro'."""
    out = []
    for v in service.get("volumes", []):
        src, dst, *mode = v.split(":")
        out.append((src, dst, mode[0] if mode else "rw"))
    return out


def flag_values(cmd: list[str]) -> dict[str, str | None]:
    """--flag value pairs (None for a flag followed by another flag or nothing)."""
    out = {}
    for i, w in enumerate(cmd):
        if w.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else None
            out[w] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def site_words(cmd: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in cmd if w.startswith("site."))


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keep systemd's CamelCase keys
    cp.read_string((DEPLOY / "systemd" / name).read_text())
    return cp


def exec_start(cp: configparser.ConfigParser, instance: str = "", env: dict[str, str] | None = None) -> list[str]:
    """ExecStart as words: continuations joined, %i and ${VAR} expanded as systemd does."""
    line = cp["Service"]["ExecStart"].replace("\\\n", " ").replace("%i", instance)
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: (env or {})[m.group(1)], line))


def environment(cp: configparser.ConfigParser, instance: str = "") -> dict[str, str]:
    return dict(w.split("=", 1) for w in shlex.split(cp["Service"]["Environment"].replace("%i", instance)))


def superlink_parser():
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    return _parse_args_run_superlink()


def assert_accepted(parser, args: list[str], what: str):
    """The real program's parser takes these words, and none of the flags is a deprecated one."""
    try:
        parsed = parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{what}: {parser.prog} rejects {shlex.join(args)} (exit {exc.code})")
    helps = {opt: a.help or "" for a in parser._actions for opt in a.option_strings}
    for flag in (w for w in args if w.startswith("--")):
        assert "deprecated" not in helps[flag].lower(), f"{what}: {flag} is deprecated in {parser.prog}"
    return parsed


# -- the SuperLink ---------------------------------------------------------------------------------
def test_superlink_compose_serves_tls_with_supernode_auth_on_its_published_port():
    svc = compose("compose.superlink.yaml")["services"]["superlink"]
    cmd = svc["command"]
    assert cmd[0] == "flower-superlink"
    flags = flag_values(cmd)
    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" in flags and "--disable-runtime-dependency-installation" in flags
    # registered keys survive a restart: the state database lives in a named volume
    named = {dst for src, dst, _ in mounts(svc) if not src.startswith((".", "/"))}
    assert str(Path(flags["--database"]).parent) in named
    by_target = {dst: (src, mode) for src, dst, mode in mounts(svc)}
    for flag, name in PKI_FILES.items():
        path = flags[flag]
        assert path in by_target, f"{flag} {path} is not mounted"
        src, mode = by_target[path]
        assert mode == "ro" and Path(src).name == name and Path(src).parent.name == "pki", (flag, src)
    assert not any(Path(src).name == "ca.key" for src, _, _ in mounts(svc)), "the CA's key must stay off the SuperLink"
    # where `server.pki install` puts them (for uid 10001, the image's user), and where the unit reads them
    unit_flags = flag_values(exec_start(unit("mrsfm-superlink.service")))
    for flag in PKI_FILES:
        assert str(Path(by_target[flags[flag]][0]).parent) == pki.INSTALL_DEST == str(Path(unit_flags[flag]).parent)
    assert flags["--host"] == "0.0.0.0"
    assert svc["ports"] == [f"{flags['--port']}:{flags['--port']}"]
    assert svc["restart"] in ("always", "unless-stopped")
    # run directories (run-dir="/runs/...") survive in a named volume, which is also the working directory
    assert svc["working_dir"] in named
    build = svc["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert_accepted(superlink_parser(), cmd[1:], "compose.superlink.yaml")


def test_superlink_unit_runs_the_same_command_supervised_and_confined():
    cp = unit("mrsfm-superlink.service")
    svc = cp["Service"]
    cmd = exec_start(cp)
    compose_cmd = compose("compose.superlink.yaml")["services"]["superlink"]["command"]
    unit_flags, compose_flags = flag_values(cmd), flag_values(compose_cmd)
    assert Path(cmd[0]).name == "flower-superlink" and Path(cmd[0]).is_absolute()
    assert set(unit_flags) == set(compose_flags), "the unit and the compose file start different SuperLinks"
    for flag, value in compose_flags.items():
        if flag in PKI_FILES:
            assert Path(unit_flags[flag]).name == PKI_FILES[flag]
        elif flag == "--database":  # in the unit's one writable folder
            assert Path(unit_flags[flag]).parent == Path(f"/var/lib/{svc['StateDirectory']}")
        else:
            assert unit_flags[flag] == value, flag
    assert "--insecure" not in cmd
    env = environment(cp)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(cmd[0]).parent)  # it spawns flower-superexec / flwr-serverapp
    assert svc["Restart"] == "always" and svc["User"] and svc["User"] != "root"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["WorkingDirectory"] == f"/var/lib/{svc['StateDirectory']}"  # the one writable place: runs
    assert_accepted(superlink_parser(), cmd[1:], "mrsfm-superlink.service")


# -- a site ----------------------------------------------------------------------------------------
def test_site_compose_reads_data_read_only_reserves_a_gpu_and_publishes_nothing():
    svc = compose("compose.site.yaml", SITE_ENV)["services"]["supernode"]
    cmd = svc["command"]
    assert cmd[:4] == ["python", "-m", "client", "--site"] and cmd[4] == "unicamp"
    words = site_words(cmd)
    assert words["site.insecure"] == "false"
    assert not any("insecure=true" in w for w in cmd)
    by_target = {dst: (src, mode) for src, dst, mode in mounts(svc)}
    assert by_target[words["site.data_dir"]] == ("/data/mrs", "ro")
    for key in ("site.root_certificates", "site.auth_private_key"):
        assert by_target[words[key]][1] == "ro", f"{key} {words[key]} is not mounted read-only"
    assert words["site.auth_private_key"] == "/etc/mrsfm/unicamp.key"
    # the site's settings (site/<site>.yaml, privacy in its overrides) from the host: no image per site
    assert by_target[svc["environment"]["MRSFM_CONFIG_DIR"]] == ("/etc/mrsfm/configs", "ro")
    state_src, state_mode = by_target[words["site.state_dir"]]
    assert state_mode == "rw" and not state_src.startswith((".", "/"))  # a named volume
    assert "ports" not in svc and svc.get("network_mode") != "host", "a site opens no port"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["restart"] == "unless-stopped"
    for missing in ("MRSFM_SITE", "MRSFM_SUPERLINK", "MRSFM_DATA"):  # no silent defaults for site-specific values
        with pytest.raises(KeyError, match=missing):
            compose("compose.site.yaml", {k: v for k, v in SITE_ENV.items() if k != missing})


@pytest.mark.parametrize("name,service", [("compose.site.yaml", "supernode"), ("compose.superlink.yaml", "superlink")])
def test_containers_write_only_their_volumes_and_hold_no_capabilities(name, service):
    svc = compose(name, SITE_ENV)["services"][service]
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    writable = {dst for _, dst, mode in mounts(svc) if mode == "rw"} | set(svc["tmpfs"])
    assert "/tmp" in writable and "/home/mrsfm" in writable  # Flower's home and scratch
    assert {"/state"} | ({"/runs"} if service == "superlink" else set()) <= writable


def test_site_unit_matches_the_compose_service():
    cp = unit("mrsfm-site@.service")
    svc = cp["Service"]
    cmd = exec_start(cp, "unicamp", {"MRSFM_SUPERLINK": SITE_ENV["MRSFM_SUPERLINK"]})
    assert Path(cmd[0]).is_absolute() and cmd[1:5] == ["-m", "client", "--site", "unicamp"]
    words = site_words(cmd)
    compose_words = site_words(compose("compose.site.yaml", SITE_ENV)["services"]["supernode"]["command"])
    assert words.keys() == compose_words.keys()
    assert {k: v for k, v in words.items() if k != "site.state_dir"} == \
           {k: v for k, v in compose_words.items() if k != "site.state_dir"}
    assert words["site.state_dir"] == f"/var/lib/{svc['StateDirectory']}".replace("%i", "unicamp")
    # read-only, and '-': a missing folder is the launcher's one line (or simulation only), not a namespace failure
    assert f'-{words["site.data_dir"]}' in svc["ReadOnlyPaths"].split()
    # the site's settings come from the host's config folder, the one the compose file mounts
    compose_svc = compose("compose.site.yaml", SITE_ENV)["services"]["supernode"]
    assert environment(cp, "unicamp")["MRSFM_CONFIG_DIR"] == compose_svc["environment"]["MRSFM_CONFIG_DIR"] == "/etc/mrsfm/configs"
    assert svc["EnvironmentFile"].replace("%i", "unicamp") == "/etc/mrsfm/unicamp.env"
    env = environment(cp, "unicamp")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(cmd[0]).parent)
    assert svc["Restart"] == "always" and svc["User"] and svc["User"] != "root"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc.get("PrivateDevices", "no") == "no", "PrivateDevices would hide the GPU"


@pytest.fixture()
def fake_superlink():
    """A plain TCP listener: enough for the launcher's reachability check."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        yield f"127.0.0.1:{srv.getsockname()[1]}"


@pytest.mark.slow  # the real site launcher for each of the kit's sites
def test_the_kits_site_words_make_a_tls_supernode_command(tmp_path, fake_superlink):
    """`python -m client --dry-run` with the words of the compose file and of the unit (absolute
    paths moved under tmp_path, dummy certificate and key, shipped spectra as the data): it takes
    them, and the flower-supernode command it prints verifies TLS and authenticates with the kit's key."""
    kit = {
        "compose": compose("compose.site.yaml", SITE_ENV)["services"]["supernode"]["command"],
        "systemd": exec_start(unit("mrsfm-site@.service"), "unicamp", {"MRSFM_SUPERLINK": "x:1"}),
    }
    procs = {}
    for name, cmd in kit.items():
        root = tmp_path / name
        words = []
        for key, value in site_words(cmd).items():
            if key == "site.superlink":
                value = fake_superlink
            elif value.startswith("/"):
                value = str(root / value.lstrip("/"))
            words.append(f"{key}={value}")
        local = site_words(words)
        shutil.copytree(INVIVO / "philips", local["site.data_dir"])
        for key in ("site.root_certificates", "site.auth_private_key"):
            Path(local[key]).parent.mkdir(parents=True, exist_ok=True)
            Path(local[key]).write_text("dummy\n")
        site = cmd[cmd.index("--site") + 1]
        configs = root / "etc" / "mrsfm" / "configs"  # the kit's MRSFM_CONFIG_DIR, moved under root like the rest
        shutil.copytree(REPO / "configs", configs)
        env = {**os.environ, "MRSFM_CONFIG_DIR": str(configs)}
        procs[name] = (local, subprocess.Popen([sys.executable, "-m", "client", "--site", site, "--dry-run", *words],
                                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env=env))
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    for name, (local, proc) in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name}: {err.strip()}"
        supernode, worker = (shlex.split(line) for line in out.strip().splitlines()[-2:])
        assert supernode[0] == "flower-supernode" and "--insecure" not in supernode
        flags = flag_values(supernode)
        # the site worker takes the SuperNode's tasks with the secret only this launch holds
        assert flags["--isolation"] == "process"
        assert flags["--superexec-auth-secret-file"] == str(Path(local["site.state_dir"]) / "worker.secret")
        assert worker[1:3] == ["-m", "client.worker"]
        assert flag_values(worker)["--secret-file"] == flags["--superexec-auth-secret-file"]
        assert flag_values(worker)["--runtime-api-address"].startswith("127.0.0.1:")
        assert flags["--superlink"] == fake_superlink
        assert flags["--root-certificates"] == local["site.root_certificates"]
        assert flags["--auth-supernode-private-key"] == local["site.auth_private_key"]
        assert f'data-dir="{Path(local["site.data_dir"]).resolve()}"' in flags["--node-config"]
        assert f'state-dir="{local["site.state_dir"]}"' in flags["--node-config"]
        assert_accepted(_parse_args_run_supernode(), supernode[1:], f"{name}: printed command")


# -- the image and the guide -----------------------------------------------------------------------
def test_dockerfile_installs_the_package_the_way_the_commands_expect():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].split()[1].startswith("python:3.11")
    copied = {w.rstrip("/") for ln in lines if ln.startswith("COPY") for w in ln.split()[1:-1]}
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    # what the wheel is built from: the packages setuptools includes, the readme pyproject names, configs/
    assert {"pyproject.toml", "README.md", "mrsfm_model", "server", "client", "configs"} <= copied
    run = " && ".join(ln for ln in lines if ln.startswith("RUN"))
    # the locked dependencies, hash-checked, then the wheel without resolving anything more
    lock = next(w for ln in lines if ln.startswith("COPY") and "requirements.lock" in ln for w in ln.split()[1:-1])
    assert lock == "deploy/requirements.lock"
    assert re.search(r"pip install --require-hashes -r (\S*)requirements\.lock\s+&& pip wheel --no-deps -w (\S+) \.\s+"
                     r"&& pip install --no-deps \2/mrsfm-\*\.whl\s+&& rm -rf", run), run
    assert "--index-url" not in run and "--extra-index-url" not in run  # nothing from outside the lock
    assert "pip install -e" not in run  # the image runs the installed wheel, not a checkout
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    user = [ln.split()[1] for ln in lines if ln.startswith("USER")]
    assert user and user[-1] not in ("root", "0")
    # the writable mount points of both compose files exist in the image, owned by its user
    chown = next(ln for ln in lines if "chown" in ln)
    targets = [dst for f, s in (("compose.superlink.yaml", "superlink"), ("compose.site.yaml", "supernode"))
               for src, dst, mode in mounts(compose(f, SITE_ENV)["services"][s]) if mode == "rw"]
    assert targets and all(t in chown for t in targets)


def test_onboarding_guide_names_real_files_commands_and_the_kits_words():
    text = (DEPLOY / "ONBOARDING.md").read_text()
    for path in set(re.findall(r"deploy/[\w./@-]+\w", text)):
        assert (REPO / path).exists(), path
    assert set(re.findall(r"server\.pki (\w+)", text)) <= {"ca", "superlink", "site", "register", "install"}
    assert "flwr supernode unregister" in text and "flwr supernode register" in text
    port = flag_values(compose("compose.superlink.yaml")["services"]["superlink"]["command"])["--port"]
    assert f":{port}" in text and "inbound" in text.lower()
    unit_words = exec_start(unit("mrsfm-site@.service"), "unicamp", {"MRSFM_SUPERLINK": "lab.example.org:8000"})
    for word in re.findall(r"site\.\w+=[^\s`]+", text):
        assert word.replace("<site>", "unicamp") in unit_words, f"the guide's {word} is not the kit's"
    readme = (DEPLOY / "README.md").read_text()
    assert "ONBOARDING.md" in readme
