"""`python -m client --site unicamp [overrides]`: a hospital joins the federation.

Reads configs/site/<site>.yaml through Hydra (`site.*` words on the command line override it;
any other `key=value` words are extra training overrides for this site), checks what would
otherwise fail later and far from the cause (unknown site, a site's config folder that is not this
release's, SuperLink not reachable, data folder missing, unreadable by this user or without usable
spectra, missing or unreadable certificate or key, a key flower-supernode cannot parse), then runs `flower-supernode` (through client/supernode.py, which sets its idle waits to
`site.poll_s`) and the site worker (client/worker.py) under one supervisor.
Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import filecmp
import grp
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from mrsfm_model.files import write_atomic

from .supernode import ENV as POLL_ENV

PROG = "python -m client"


class SiteError(Exception):
    """A problem the site operator can fix, said in one line."""


def release() -> str:
    """This installation's identity, for the lab and the site to compare: the package version and,
    in a git checkout, its commit (a modified tree is marked)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ident = f"mrsfm {version('mrsfm')}"
    except PackageNotFoundError:
        ident = "mrsfm (not installed)"
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    return f"{ident}, commit {commit}{' (modified)' if dirty else ''}" if commit else f"{ident} (no git commit)"


def known_sites() -> list[str]:
    from mrsfm_model.config import config_names

    return config_names("site")


def release_configs() -> Path | None:
    """The configs/ this installation carries (a wheel's mrsfm_model/configs, or a checkout's)."""
    from mrsfm_model.config import release_config_dir

    return release_config_dir()


def check_config_dir() -> Path | None:
    """MRSFM_CONFIG_DIR, a site's own copy of configs/ outside the installation (mounted into the
    container, /etc/mrsfm/configs for the systemd unit), so that adding or changing a site file needs
    no new image: it must hold config.yaml, and everything but site/ must be this release's (else
    this site would compose another training config than the lab and the other sites)."""
    env = os.environ.get("MRSFM_CONFIG_DIR")
    if not env:
        return None
    folder = Path(env)
    if not (folder / "config.yaml").is_file():
        raise SiteError(f"MRSFM_CONFIG_DIR={env} holds no config.yaml; copy this release's configs/ folder there "
                        f"(e.g. sudo cp -r configs {env}) and add this site's site/<site>.yaml to it")
    shipped = release_configs()
    if shipped is None or shipped.resolve() == folder.resolve():
        return folder
    shared = sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml") if p.relative_to(shipped).parts[0] != "site")
    differ = [str(rel) for rel in shared if not (folder / rel).is_file()
              or not filecmp.cmp(shipped / rel, folder / rel, shallow=False)]
    if differ:
        raise SiteError(f"MRSFM_CONFIG_DIR={env} is not this release's configs: {', '.join(differ[:3])}"
                        f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''} differ from the installed "
                        f"ones ({shipped}); copy them from the release again (a site's own settings belong in "
                        "site/<site>.yaml only)")
    return folder


def load_site(site: str, overrides: list[str]):
    """The composed config with the site's settings under `cfg.site`."""
    from mrsfm_model.config import load_config

    if site not in (sites := known_sites()):
        raise SiteError(f"unknown site {site!r}; known sites: {', '.join(sites) or '(none)'} (configs/site/*.yaml)")
    site_words = [o for o in overrides if o.lstrip("+~").startswith("site.")]
    train_words = [o for o in overrides if o not in site_words]
    try:
        cfg = load_config([f"+site={site}", *site_words])
        own = load_config(list(cfg.site.get("overrides") or []) + train_words)  # fail here, not in round 1
    except ValueError as exc:
        raise SiteError(str(exc)) from None
    if str(cfg.site.name) != site:  # e.g. a copied unicamp.yaml: the server would record this hospital as unicamp
        raise SiteError(f"configs/site/{site}.yaml says name: {cfg.site.name}; a site's file must carry its own name "
                        f"(after copying another site's file, change name, vendor and runtime_port)")
    if own.privacy.enabled and simulation_only(cfg):  # DP protects in vivo spectra; the app would fail every round
        raise SiteError(f"privacy.enabled is true but this site has no in vivo spectra ({simulation_only(cfg)}); "
                        "differential privacy protects a site's own spectra: turn it on when they are read")
    return cfg, train_words


def check_device(device: str) -> str:
    """What the site will train on, in words; a GPU asked for but not visible is an error, not a
    silent CPU run (torch is imported only then: the launcher stays quick otherwise)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise SiteError(f"site.device is {device} but no such GPU is visible to this process "
                            f"({torch.cuda.device_count()} visible); check the driver (nvidia-smi) and the "
                            f"container's GPU access, or set site.device=cpu")
        return f"GPU {device}"
    if device == "auto":
        gpu = Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())
        return "auto: a GPU is visible" if gpu else "auto: no GPU visible, training on the CPU"
    return device


def check_superlink(address: str, insecure: bool, timeout_s: float = 5.0) -> None:
    """The SuperLink answers, and speaks what this site will speak: flower-supernode retries for
    ever, saying little, when one side uses TLS and the other does not."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SiteError(f"site.superlink must be host:port, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SiteError(f"cannot reach the SuperLink at {address} ({exc.strerror or exc}); is flower-superlink "
                        "running there, and is the port open to this machine?") from None
    speaks = speaks_tls(host.strip("[]"), int(port))
    if insecure and speaks is True:
        raise SiteError(f"the SuperLink at {address} speaks TLS but site.insecure is true; set "
                        "site.insecure=false and site.root_certificates to the lab's ca.crt")
    if not insecure and speaks is False:
        raise SiteError(f"the SuperLink at {address} does not speak TLS but site.insecure is false; ask the lab "
                        "(a SuperLink for hospitals must use TLS)")


def speaks_tls(host: str, port: int, timeout_s: float = 2.0) -> bool | None:
    """True: a TLS handshake completes (certificate not checked here: flower-supernode does);
    False: the server answers with something that is not TLS; None: cannot tell (silent, closed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, ctx.wrap_socket(raw) as tls:
            tls.version()
            return True
    except ssl.SSLError as exc:
        return False if "WRONG_VERSION_NUMBER" in str(exc).upper() or "record layer" in str(exc) else None
    except OSError:
        return None


def check_runtime_port(port: int) -> None:
    """flower-supernode would die with a traceback on a port already taken (another SuperNode of
    this machine, a leftover process): say so in one line instead."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as exc:
            raise SiteError(f"site.runtime_port {port} is in use on this machine ({exc.strerror or exc}); another "
                            "SuperNode may be running: stop it, or give this site a free port "
                            "(site.runtime_port=...)") from None


def _who() -> str:
    """This process's user, as `ls -l` and the fix would name it: name and uid, group and gid."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"user {user} (uid {uid}, group {group} gid {gid})"


def _owner_mode(path: Path) -> str:
    st = path.stat()
    return f"owner uid {st.st_uid} gid {st.st_gid}, mode {st.st_mode & 0o7777:04o}"


def check_data_access(folder: Path) -> list[Path]:
    """The data folder exists and this user may list it: else one line naming the folder, its
    owner and mode, and who asks. Returns the files and folders inside it that this user cannot
    read (what the loader would otherwise count as broken spectra, without saying why)."""
    fix = (f"give this service's user read access (the container's user is uid 10001), e.g. sudo chgrp -R "
           f"{os.getegid()} {folder} && sudo chmod -R g+rX {folder}")
    if not folder.exists():
        raise SiteError(f"site.data_dir {folder} does not exist; put the spectra there (or mount them there), or, "
                        "until they are ready, set simulation_only: true in this site's file")
    if not folder.is_dir():
        raise SiteError(f"site.data_dir {folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise SiteError(f"site.data_dir {folder} cannot be read by {_who()}: {_owner_mode(folder)}; {fix}")
    denied = []
    for top, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.access(Path(top, name), os.R_OK | os.X_OK):
                denied.append(Path(top, name))
        denied += [Path(top, name) for name in files if not os.access(Path(top, name), os.R_OK)]
    return denied


def check_data_dir(data_dir: str | None) -> str:
    """'' for simulation only, else the folder, which this user must be able to read and which must
    hold at least one usable spectrum."""
    if not data_dir:
        return ""
    from mrsfm_model.data.io import load_folder
    from mrsfm_model.errors import MRSDataError

    folder = Path(data_dir).expanduser().resolve()
    denied = check_data_access(folder)
    try:
        spectra, errors = load_folder(folder)
    except MRSDataError as exc:
        raise SiteError(str(exc)) from None
    if denied:
        what = (f"{len(denied)} file(s) or folder(s) in site.data_dir {folder} cannot be read by {_who()}, e.g. "
                f"{denied[0]} ({_owner_mode(denied[0])}); give this service's user read access, e.g. sudo chgrp -R "
                f"{os.getegid()} {folder} && sudo chmod -R g+rX {folder}")
        if not spectra:
            raise SiteError(what)
        print(f"{PROG}: warning: {what}; they are left out", file=sys.stderr, flush=True)
    if not spectra:
        why = f" ({len(errors)} file(s) unreadable, e.g. {errors[0]})" if errors else ""
        raise SiteError(f"{folder}: no usable spectra in the data folder{why}; until the data are ready, set "
                        "simulation_only: true in this site's file (it then trains on simulated spectra only)")
    return str(folder)


def simulation_only(cfg) -> str:
    """Why this site trains on simulated spectra only ('' when it reads its data folder)."""
    flag = cfg.site.get("simulation_only", False)
    if not isinstance(flag, bool):
        raise SiteError(f"site.simulation_only must be true or false, got {flag!r}")
    if flag:
        return f"site.simulation_only is true: {cfg.site.data_dir or 'the data folder'} is not read"
    return "" if cfg.site.data_dir else "site.data_dir is null"


def _word(word: str) -> str:
    """One override, quoted for shlex.split on the other side only when it must be."""
    return f"'{word}'" if any(c.isspace() for c in word) and "'" not in word else word


def _literal(key: str, value: str) -> str:
    """A node-config value as Flower parses it: a TOML string without quotes or backslashes inside."""
    if '"' in value or "\\" in value:
        raise SiteError(f"{key} must not contain double quotes or backslashes: {value!r}")
    return f'{key}="{value}"'


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SiteError(f"{key} {path} cannot be read ({exc.strerror or exc}); check its owner and mode") from None


def check_tls_files(cfg) -> None:
    """The certificate and key contents, which flower-supernode would refuse without naming the file."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    s = cfg.site
    if not s.insecure:
        path = Path(str(s.root_certificates)).expanduser()
        try:
            x509.load_pem_x509_certificates(_read("site.root_certificates", path))
        except ValueError:
            raise SiteError(f"site.root_certificates {path} is not a PEM certificate; use the lab's ca.crt") from None
    if s.get("auth_private_key"):
        path = Path(str(s.auth_private_key)).expanduser()
        try:
            key = load_ssh_private_key(_read("site.auth_private_key", path), None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SiteError(f"site.auth_private_key {path} is not an unencrypted OpenSSH EC private key; make one "
                            f"with `python -m server.pki site {s.name}`")


def supernode_command(cfg, train_words: list[str], data_dir: str) -> list[str]:
    s = cfg.site
    cmd = ["flower-supernode", "--superlink", str(s.superlink), "--port", str(int(s.runtime_port))]
    if s.insecure:
        cmd.append("--insecure")
    else:
        if not s.root_certificates or not Path(str(s.root_certificates)).expanduser().is_file():
            raise SiteError(f"site.insecure is false but site.root_certificates ({s.root_certificates}) is not a file")
        cmd += ["--root-certificates", str(Path(str(s.root_certificates)).expanduser())]
        _read("site.root_certificates", Path(str(s.root_certificates)).expanduser())
    if s.get("auth_private_key"):
        key = Path(str(s.auth_private_key)).expanduser()
        if not key.is_file():
            raise SiteError(f"site.auth_private_key {key} is not a file")
        _read("site.auth_private_key", key)
        cmd += ["--auth-supernode-private-key", str(key)]
    local = list(s.get("overrides") or []) + train_words
    node = {"site": str(s.name), "data-dir": data_dir, "state-dir": str(Path(str(s.state_dir)).expanduser()),
            "device": str(s.device), "log-level": str(s.log_level), "overrides": " ".join(_word(w) for w in local)}
    return cmd + ["--node-config", " ".join(_literal(k, v) for k, v in node.items())]


def worker_command(cfg, secret_file: Path) -> list[str]:
    """The site worker (client/worker.py) that takes this SuperNode's tasks."""
    s = cfg.site
    cmd = [sys.executable, "-m", "client.worker", "--runtime-api-address", f"127.0.0.1:{int(s.runtime_port)}",
           "--secret-file", str(secret_file), "--log-level", str(s.log_level), "--parent-pid", str(os.getpid()),
           "--state-dir", str(Path(str(s.state_dir)).expanduser())]
    for digest in s.trusted_apps or []:
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise SiteError(f"site.trusted_apps: {str(digest)[:80]!r} is not a SHA-256 hex digest (64 of 0-9a-f)")
        cmd += ["--trusted-app", str(digest)]
    return cmd


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this launcher dies, even by SIGKILL (no orphaned SuperNode)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """flower-supernode and the site worker under one process, with one lifetime. When the worker
    dies both are started again (a SuperNode whose executor died keeps waiting for that task's reply
    for about a minute; a fresh one registers again and takes the next round); the worker's state
    comes back from disk. Everything stops with the SuperNode or on SIGTERM / Ctrl-C."""

    def __init__(self, supernode: list[str], worker: list[str] | None, env: dict[str, str]):
        self.supernode_cmd, self.worker_cmd, self.env = supernode, worker, env
        self.node: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.stopping = False

    def _start(self) -> None:
        self.node = subprocess.Popen(self.supernode_cmd, env=self.env, preexec_fn=_die_with_parent)
        if self.worker_cmd:
            self.worker = subprocess.Popen(self.worker_cmd, env=self.env, preexec_fn=_die_with_parent)

    def run(self) -> int:
        from client.worker import EXIT_CONFLICT

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._stop(signum))
        self._start()
        backoff, started = 1.0, time.monotonic()
        while True:
            code = self.node.poll()
            if code is not None:
                self._stop(None)
                return 0 if self.stopping else code
            if self.worker is not None and (wcode := self.worker.poll()) is not None and not self.stopping:
                if wcode == EXIT_CONFLICT:  # said why in one line (refused secret, state folder held)
                    print(f"{PROG}: the site worker cannot serve (see the line above); stopping", file=sys.stderr,
                          flush=True)
                    self._stop(None)
                    return 2
                backoff = min(30.0, backoff * 2) if time.monotonic() - started < 30 else 1.0
                print(f"{PROG}: site worker exited (code {wcode}); restarting it with its SuperNode in {backoff:.0f} s "
                      "(state comes back from disk; the round in flight fails at this site only)",
                      file=sys.stderr, flush=True)
                self._stop(None)
                time.sleep(backoff)
                started = time.monotonic()
                self._start()
            time.sleep(0.2)

    def _stop(self, signum: int | None) -> None:
        self.stopping = self.stopping or signum is not None
        for proc in (self.worker, self.node):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self.worker, self.node):
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if signum is not None:
            raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Join the federation as one site (flower-supernode "
                                     "and its site worker).")
    parser.add_argument("--version", action="version", version=release())
    parser.add_argument("--site", required=True, help="name of configs/site/<name>.yaml")
    parser.add_argument("--dry-run", action="store_true", help="check and print the commands only")
    parser.add_argument("overrides", nargs="*", help="site.key=value (site settings) or other Hydra overrides")
    args = parser.parse_args(argv)
    try:
        check_config_dir()
        cfg, train_words = load_site(args.site, args.overrides)  # local problems first, then the network
        poll_s = float(cfg.site.poll_s)
        if not 0.05 <= poll_s <= 60:
            raise SiteError(f"site.poll_s must be between 0.05 and 60 seconds, got {cfg.site.poll_s}")
        sim_only = simulation_only(cfg)
        data_dir = "" if sim_only else check_data_dir(cfg.site.data_dir)
        cmd = supernode_command(cfg, train_words, data_dir)
        state_dir = Path(str(cfg.site.state_dir)).expanduser()
        secret = state_dir / "worker.secret"
        warm = bool(cfg.site.worker)
        worker = worker_command(cfg, secret) if warm else None
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)] if warm else []
        if not args.dry_run:  # --dry-run checks that the files are there and readable, not what they hold
            check_tls_files(cfg)
        device = check_device(str(cfg.site.device))
        try:
            check_runtime_port(int(cfg.site.runtime_port))
        except SiteError as exc:
            if not args.dry_run:
                raise
            print(f"{PROG}: note: {exc} (the dry run does not need the port)", file=sys.stderr)
        check_superlink(str(cfg.site.superlink), bool(cfg.site.insecure))
        if sim_only:  # loud, at every start: the lab's metrics say it too (simulation_only per site)
            print(f"{PROG}: WARNING: simulation only: no in vivo spectra ({sim_only}); this site trains on "
                  "simulated spectra alone", file=sys.stderr, flush=True)
        if args.dry_run:
            print(shlex.join(cmd))
            if worker:
                print(shlex.join(worker))
            return 0
        path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")  # the venv's bin first
        exe = shutil.which("flower-supernode", path=path)
        if exe is None:
            raise SiteError("flower-supernode not found; install mrsfm (pip install -e .) in this environment")
        if warm:  # a fresh secret per launch, readable by this user only: who holds it may take the site's tasks
            state_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(secret, secrets.token_bytes(32), mode=0o600)
    except SiteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, "PATH": path}  # the SuperNode starts flower-superexec and flwr-clientapp from PATH
    env[POLL_ENV] = str(poll_s)  # client/supernode.py: Flower's SuperNode with this site's idle waits
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    mode = ("site worker on (warm model between rounds; only this installation's client code runs)" if warm else
            "site worker off (site.worker=false): every message starts a fresh process running the app bundle's code")
    print(f"{PROG}: {release()}", file=sys.stderr, flush=True)
    print(f"{PROG}: site {cfg.site.name} -> SuperLink {cfg.site.superlink}, data "
          f"{data_dir or '(simulation only)'}; device {device}; {mode}; idle poll every {poll_s:g} s", file=sys.stderr, flush=True)
    return Supervisor([sys.executable, "-m", "client.supernode", *cmd[1:]], worker, env).run()


if __name__ == "__main__":
    sys.exit(main())
