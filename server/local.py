"""A whole federation on one machine: a real SuperLink, one real SuperNode per site, `flwr run`.

Every process starts in its own process group (SuperNodes and the SuperLink spawn helpers,
`flower-superexec`, `flwr-clientapp`, `flwr-serverapp`, that would otherwise outlive them) and
every group is stopped on the way out, also on Ctrl-C or SIGTERM. Flower's home (connections,
state) is a folder of the run, so nothing touches ~/.flwr, and app dependencies are never
installed at run time. Sites start through `python -m client --site X`, exactly as a hospital does.

`secure=True` is the documented deployment (deploy/README.md) on loopback: a PKI under OUT/pki made
with server.pki (CA, SuperLink certificate, one key pair per site), a SuperLink with TLS and
`--enable-supernode-auth`, every site's key registered, and every SuperNode on TLS with its key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mrsfm_model.logs import Log, get_logger

from . import pki
from .bundle import run_config_arg, stage_app
from .example_sites import SITES, prepare_site_data
from .rundir import RunDir

_log = get_logger("server")

CONNECTION = "mrsfm-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """Start/stop the processes of a loopback federation; `run()` one `flwr run` on it."""

    def __init__(self, out_dir: str | Path, sites: Sequence[str] = SITES, data_dirs: dict[str, Path] | None = None,
                 log: Log = _log.info, threads_per_site: int | None = None, secure: bool = False,
                 database: str | Path | None = None):
        """`secure`: TLS + SuperNode authentication with a PKI under OUT/pki (made once, then reused).
        `database`: the SuperLink's SQLite state file (default: in memory); registered site keys live in
        the state, so with a database they survive a SuperLink restart, without one they are registered
        again on every `start_superlink`."""
        self.out = Path(out_dir).resolve()
        self.sites, self.data_dirs, self.log = list(sites), dict(data_dirs or {}), log
        self.home, self.logs = self.out / "flwr_home", self.out / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.pgids: list[int] = []  # every process group ever started here
        self.lock, self._closing, self._watchdog = threading.Lock(), threading.Event(), None
        self.app: Path | None = None  # the staged Flower app, made on the first run
        self.secure, self.database = secure, (Path(database).resolve() if database else None)
        self.pki = self.out / "pki"
        self.registration = None  # server.pki.Registration of the last start_superlink (secure)
        if secure:
            self._make_pki()
        bin_dir = str(Path(sys.executable).parent)
        threads = threads_per_site or max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "MRSFM_RUN_ROOT": os.environ.get("MRSFM_RUN_ROOT") or str(self.out)}  # runs go under OUT
        tls = f'root-certificates = "{self.pki / "ca.crt"}"\n' if secure else "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{tls}')

    def _make_pki(self) -> None:
        """OUT/pki as `python -m server.pki` makes it for a SuperLink on loopback; existing files are kept."""

        lay = pki.Layout(self.pki)
        if not lay.ca_crt.exists():
            pki.make_ca(self.pki)
        if not lay.superlink_crt.exists():
            pki.make_superlink(self.pki, hosts=[], ips=[])  # DNS:localhost, IP:127.0.0.1 and ::1 always
        for site in self.sites:
            if not lay.site_key(site).exists():
                pki.make_site(self.pki, site)

    def register_sites(self, sites: Sequence[str] | None = None):
        """`flwr supernode register` every site's public key (server.pki.register); already registered
        keys (a SuperLink with a database) are fine. Raises RuntimeError naming the ones that failed."""

        res = pki.register(self.pki, CONNECTION, list(sites or self.sites), env=self.env)
        if not res.ok:
            raise RuntimeError("SuperNode registration failed: " +
                               "; ".join(f"{site}: {why}" for site, why in res.failed.items()))
        self.registration = res
        return res

    # -- processes -----------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                cwd=self.out, start_new_session=True)  # own process group: stop() reaches its helpers
        out.close()
        with self.lock:
            self.procs[name] = proc
            self.pgids.append(proc.pid)
        return proc

    def start_superlink(self, timeout_s: float = 30.0) -> None:
        """In-memory state by default: 1.41's SQLite state (--database) stores the weights too and fails
        with 'database is locked' under ViT-B-sized transfers; SuperNodes re-register instead (supervise).
        Secure: TLS + --enable-supernode-auth, and the sites' keys registered once the port is open."""
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.secure:
            cmd += ["--ssl-ca-certfile", str(self.pki / "ca.crt"), "--ssl-certfile", str(self.pki / "superlink.crt"),
                    "--ssl-keyfile", str(self.pki / "superlink.key"), "--enable-supernode-auth"]
        else:
            cmd.append("--insecure")
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        self._spawn("superlink", cmd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                if self.secure:
                    self.register_sites()
                return
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not open port {self.port} in {timeout_s:g} s")

    def start_supernode(self, site: str, name: str | None = None, env: dict[str, str] | None = None,
                        **settings) -> None:
        """`python -m client --site SITE` with this federation's address, data and state folders (and, when
        secure, its CA certificate and the site's key). `settings` replace `site.*` values, e.g.
        `insecure=True` or `auth_private_key=PATH`; `name` (default supernode_SITE) names the process and
        its log; a name outside the federation's sites is never restarted by the supervisor; `env` adds
        environment variables (e.g. FLWR_LOG_LEVEL=DEBUG)."""
        data = self.data_dirs.get(site)
        values: dict = {"superlink": f"127.0.0.1:{self.port}", "data_dir": data, "state_dir": self.out / "state" / site,
                        "runtime_port": free_port()}
        if self.secure:
            values.update(insecure=False, root_certificates=self.pki / "ca.crt",
                          auth_private_key=self.pki / "sites" / f"{site}.key")
        values.update(settings)
        words = [f"site.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in values.items()]
        self._spawn(name or f"supernode_{site}", [sys.executable, "-m", "client", "--site", site, *words], env)

    def restart_supernodes(self) -> None:
        """Start the running SuperNodes again, e.g. after a SuperLink restart (it forgot them)."""
        running = [site for site in self.sites if f"supernode_{site}" in self.procs]
        self.stop(*[f"supernode_{site}" for site in running], grace_s=5.0)
        for site in running:
            self.start_supernode(site)

    def start_supernodes(self, data_dirs: dict[str, Path] | None = None, supervise: bool = True) -> None:
        """One SuperNode per site; `supervise` restarts one that exits on its own, as systemd's
        Restart=always does at a hospital (a SuperNode exits when a restarted SuperLink no longer
        knows it, and must register again)."""
        self.data_dirs.update(data_dirs or {})
        for site in self.sites:
            self.start_supernode(site)
        if supervise and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._supervise, daemon=True)
            self._watchdog.start()

    def _supervise(self) -> None:
        while not self._closing.wait(1.0):
            for site in self.sites:
                name = f"supernode_{site}"
                with self.lock:
                    proc = self.procs.get(name)
                    if proc is None or proc.poll() is None or self._closing.is_set():
                        continue  # stopped on purpose (popped), still running, or shutting down
                    del self.procs[name]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its helpers, if any are left
                self.log(f"SuperNode of {site} exited (code {proc.returncode}); starting it again")
                self.start_supernode(site)

    def stop(self, *names: str, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Signal process groups together (with the groups of their descendants: the SuperLink starts
        flower-superexec in a session of its own); SIGKILL whatever is left after `grace_s`."""
        with self.lock:
            procs = [p for p in (self.procs.pop(n, None) for n in names) if p is not None]
            groups = {g for p in procs for g in {p.pid} | _descendant_groups(p.pid)} - {os.getpgrp()}
            self.pgids.extend(sorted(groups - set(self.pgids)))
        for g in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, sig)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for g in groups:
            with contextlib.suppress(ProcessLookupError):  # helpers may outlive their leader
                os.killpg(g, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def close(self) -> None:
        """Stop the SuperNodes, then the SuperLink (so no node logs a lost connection)."""
        self._closing.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        self.stop(*[n for n in list(self.procs) if n != "superlink"], grace_s=5.0)
        self.stop("superlink", grace_s=5.0)

    def __enter__(self) -> LocalFederation:
        """Starts the SuperLink (SuperNodes: `start_supernodes`); `with` stops every process group."""
        try:
            self.start_superlink()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one run -------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.out, capture_output=True, text=True,
                              timeout=timeout)

    def status(self, run_id: int) -> str:
        """Flower's own word on a run, e.g. 'finished:completed' or 'finished:failed'."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout)["runs"]
        except (ValueError, KeyError):
            return f"unknown ({(res.stdout + res.stderr).strip()[-200:]})"
        return str(runs[0]["status"]) if runs else "unknown (no such run)"

    def run(self, run_config: dict, timeout_s: float = 900.0, show: Callable[[str], str | None] | None = None,
            app: str | Path | None = None, meanwhile: Callable[[], None] | None = None) -> dict:
        """`flwr run APP --stream` with `run_config` overrides; returns run id, status and seconds.

        `app`: the app folder (default: a copy of this repository's, see `stage_app`). `meanwhile`
        runs right after the submission, e.g. to start SuperNodes while the ServerApp boots."""
        show = show or _progress
        if app is None:
            app = self.app = self.app or stage_app(self.out)
        cmd = ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", run_config_arg(run_config)]
        t0, run_id = time.monotonic(), None
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.out,
                                text=True, start_new_session=True)
        timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            if meanwhile is not None:
                meanwhile()
            with open(self.logs / "flwr_run.log", "a") as transcript:
                for line in proc.stdout:
                    transcript.write(line)
                    transcript.flush()
                    line = _strip_ansi(line.rstrip())
                    if run_id is None and (m := re.search(r"started run (\d+)", line)):
                        run_id = int(m.group(1))
                    if (shown := show(line)) is not None:
                        self.log(shown)
            proc.wait()
        finally:
            timer.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.monotonic() - t0
        if run_id is None:
            raise RuntimeError(f"flwr run did not start a run; see {self.logs / 'flwr_run.log'}")
        status = self.status(run_id)
        if seconds >= timeout_s and not status.startswith("finished"):
            self.flwr("stop", str(run_id), CONNECTION)
            status = f"timed out after {timeout_s:g} s ({status})"
        return {"run_id": run_id, "status": status, "seconds": round(seconds, 1)}


def _descendant_groups(pid: int) -> set[int]:
    """Process groups of `pid`'s descendants (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    group: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        group[child] = int(fields[2])
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(group[child])
            todo.append(child)
    return found


def _progress(line: str) -> str | None:
    """The stream lines worth showing: the ServerApp's own ([mrsfm]) and errors."""
    if "[mrsfm] " in line:
        return "      " + line.split("[mrsfm] ", 1)[1]
    return line if "ERROR" in line else None


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so `finally` stops every process group."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local_federation(out_dir: str | Path, sites: Sequence[str] = SITES, rounds: int = 2, local_steps: int = 5,
                         overrides: Iterable[str] = ("model=micro", "data.batch_size=8"), strategy: str = "fedavg",
                         wire_dtype: str = "bf16", min_sites: int | None = None, timeout_s: float = 900.0,
                         log: Log = _log.info, secure: bool = False, data_dirs: dict[str, Path] | None = None,
                         **run_config) -> dict:
    """Federated MAE pretraining of `sites` on loopback; everything lands under `out_dir`.

    out_dir/run/ the run directory (rounds/, metrics.jsonl, encoder.safetensors, ...),
    out_dir/logs/ every process' output, out_dir/sites/<site>/ each site's private data
    (prepare_site_data, unless `data_dirs` names each site's folder), out_dir/state/<site>/ its
    optimizer state, out_dir/flwr_home/ Flower's connection and app store, out_dir/app/ the Flower
    app as submitted. Returns {run_id, status, seconds, run_dir, rounds (the metrics.jsonl rows),
    encoder, total_seconds}.
    `secure`: TLS + SuperNode authentication, the PKI in out_dir/pki/ (see LocalFederation).
    Extra keyword arguments are run-config keys with '_' for '-' (e.g. wait_timeout_s=60).
    Raises RuntimeError when the run does not finish as completed.
    """

    out = Path(out_dir).resolve()
    t0 = time.monotonic()
    config = {"overrides": " ".join(overrides), "num-rounds": rounds, "local-steps": local_steps,
              "run-dir": str(out / "run"), "min-sites": min_sites or len(sites), "wire-dtype": wire_dtype,
              "strategy": strategy, "sites": ",".join(sites),
              **{k.replace("_", "-"): v for k, v in run_config.items()}}

    def sites_join() -> None:  # while the ServerApp boots
        folders = data_dirs if data_dirs is not None else prepare_site_data(out / "sites", sites)
        where = ", ".join(f"{site} {folders.get(site) or '(simulation only)'}" for site in sites)
        log(f"[2/3] one SuperNode per site; private data: {where}")
        fed.start_supernodes(folders)

    with _sigterm_as_interrupt(), LocalFederation(out, sites, log=log, secure=secure) as fed:
        tls = " (TLS; registered site keys only)" if secure else ""
        log(f"[1/3] SuperLink on 127.0.0.1:{fed.port}{tls}; flwr run: {rounds} round(s) x {local_steps} local steps, "
            f"{strategy}, {wire_dtype} on the wire; logs in {fed.logs}")
        result = fed.run(config, timeout_s=timeout_s, meanwhile=sites_join)
        log(f"[3/3] run {result['run_id']}: {result['status']}")
    rd = RunDir(out / "run")
    result.update(run_dir=str(rd.path), rounds=rd.read_metrics(), encoder=str(rd.path / "encoder.safetensors"),
                  total_seconds=round(time.monotonic() - t0, 1))
    if result["status"] != "finished:completed":
        raise RuntimeError(f"federated run {result['run_id']} ended {result['status']}; "
                           f"see {out / 'logs'} (flwr_run.log, superlink.log, supernode_*.log)")
    log(f"done in {result['total_seconds']} s: {len(result['rounds'])} round(s), final loss "
        f"{result['rounds'][-1]['loss']:.4f}, encoder -> {result['encoder']}")
    return result
