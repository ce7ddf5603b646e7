"""The site worker: one long-lived process per site that takes the SuperNode's ClientApp tasks and
runs this site's *installed* ClientApp in-process, keeping the run's model, optimizer and data
stream warm between rounds (client/app.py `SiteSession`).

Why: Flower 1.41 starts a fresh `flwr-clientapp` process per message (SuperNode isolation
`subprocess`), so every round re-imports torch and rebuilds everything, and that process runs the
code of whatever app bundle the coordinator submitted, next to the private data. With isolation
`process` the SuperNode leaves task execution to an executor of the site's choosing; this is it.
The bundle's code is never imported here. Its client files must equal the installed ones (a
bundle of another release or with changed client code is refused, naming the file), or its
SHA-256 must be on the site's `site.trusted_apps` list: then the site takes part in that run,
still with its installed client code.

Started by `python -m client --site X` beside flower-supernode and restarted by it when it dies;
`python -m client.worker --runtime-api-address 127.0.0.1:PORT --secret-file F` runs one by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Collection
from functools import cache
from pathlib import Path

from client.app import app as installed_app
from mrsfm_model import logs

CLIENT_DIR = Path(__file__).resolve().parent
EXIT_CONFLICT = 3  # this worker must not serve (refused secret, state folder held): restarting would not help
_log = logs.get_logger("client.worker")


class BundleRefused(Exception):
    """The run's app bundle is not one this site agreed to serve (one line, names the reason)."""


def check_bundle(content: bytes, trusted: Collection[str] = (), installed: Path = CLIENT_DIR) -> str:
    """The bundle's SHA-256 when this site serves it, else BundleRefused: a hash on `trusted`, or a
    bundle whose client/*.py are byte-identical to this installation's (same release, same code)."""
    digest = hashlib.sha256(content).hexdigest()
    if digest in set(trusted):
        return digest
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            theirs = {n: z.read(n) for n in z.namelist() if n.startswith("client/") and n.endswith(".py")}
    except zipfile.BadZipFile:
        raise BundleRefused(f"app bundle {digest[:12]} is not a zip archive") from None
    mine = _installed_sources(installed)
    for name in sorted(theirs.keys() | mine.keys()):
        if theirs.get(name) != mine.get(name):
            what = "is missing from it" if name not in theirs else ("is not in this installation" if name not in mine
                                                                    else "differs from this site's installed copy")
            raise BundleRefused(f"app bundle {digest[:12]}: {name} {what} (another mrsfm release, or changed code); "
                                f"this site runs only its installed code; to take part in this run anyway (still with "
                                f"the installed code) add sha256 {digest} to site.trusted_apps")
    return digest


@cache
def _installed_sources(installed: Path) -> dict[str, bytes]:
    """client/*.py of this installation, read once per process (they do not change under a running worker)."""
    return {f"client/{p.name}": p.read_bytes() for p in installed.glob("*.py")}


class WorkerConflict(Exception):
    """This worker must not serve: the SuperNode refuses its secret, or another worker holds the state folder."""


class DeviceBroken(Exception):
    """A task left the GPU unusable for every later task (a fatal CUDA error): a fresh process is needed."""


def hold_state_dir(state_dir: Path):
    """An exclusive lock on STATE_DIR/worker.lock for this process' lifetime (returns the open file):
    two workers of one site would each think its in-memory state the latest."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    fh = open(state_dir / "worker.lock", "a+")  # noqa: SIM115 (held open: the lock lives with it)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        other = fh.read().strip() or "?"
        fh.close()
        raise WorkerConflict(f"another site worker (pid {other}) already serves {state_dir}; stop it first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


class SiteWorker:
    """Polls the SuperNode's Runtime API for ClientApp tasks and runs each one in this process."""

    def __init__(self, runtime_address: str, secret: bytes | None, trusted: Collection[str] = (),
                 poll_s: float = 0.05, handler: Callable | None = None):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address, self.trusted, self.poll_s = runtime_address, set(trusted), poll_s
        self.bundles_logged: set[int] = set()  # runs whose bundle hash this worker has logged
        self.handler = handler or installed_app  # the installed ClientApp, never the bundle's
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:  # only the holder of the site's secret may take its tasks
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None, interceptors=interceptors,
            retry_invoker=_retries(1))  # one try per poll: serve_forever waits and retries itself
        self.stopping = threading.Event()
        self.served = 0
        self.poisoned = ""

    def serve_forever(self) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        _log.info(f"[mrsfm] site worker ready (pid {os.getpid()}), taking tasks from "
                  f"the SuperNode at {self.address}")
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        while not self.stopping.is_set():
            try:
                res = self.client.AcquireTask(request)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (401, 403):
                    raise WorkerConflict(f"the SuperNode at {self.address} refused this worker's secret (HTTP "
                                        f"{exc.response.status_code}): only the worker started with the SuperNode "
                                        "(python -m client) may take its tasks") from None
                _log.warning(f"[mrsfm] SuperNode at {self.address} answered HTTP {exc.response.status_code}; retrying")
                self.stopping.wait(2.0)
                continue
            except Exception as exc:  # the SuperNode restarting: wait for it, keep the warm state
                _log.warning(f"[mrsfm] SuperNode at {self.address} not answering ({type(exc).__name__}); retrying")
                self.stopping.wait(2.0)
                continue
            if res.HasField("task") and res.token:
                try:
                    self.run_task(res.token)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # e.g. Flower's RunNotRunningException: that task only
                    _log.error(f"[mrsfm] task ended: {type(exc).__name__}: {exc}")
                if self.poisoned:  # a broken CUDA context fails every later task: exit, the launcher restarts
                    raise DeviceBroken(f"the device is in an unusable state ({self.poisoned}); exiting to be restarted")
            else:
                self.stopping.wait(self.poll_s)
        self.client.close()

    def run_task(self, token: str) -> None:
        """One message: pull it with the task's token, check the bundle, run the installed ClientApp,
        push the reply. Any failure becomes an error reply, so the server aggregates the other sites."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(  # a revoked token fails this task, never the worker
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=_retries(5))
        message = context = reply = beat = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        t = [time.perf_counter()]
        try:
            beat = HeartbeatSender(_heartbeat(client))
            beat.start()
            message, context, fab = _pull_task_input(client)
            digest = check_bundle(fab.content, self.trusted)
            if context.run_id not in self.bundles_logged:  # once per run: the lab compares it with `flwr ls`
                self.bundles_logged.add(context.run_id)
                _log.info(f"[mrsfm] run {context.run_id}: serving app bundle sha256 {digest}")
            t.append(time.perf_counter())
            reply = self.handler(message=message, context=context)
            t.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except BundleRefused as exc:
            _log.error(f"[mrsfm] refused run {getattr(context, 'run_id', '?')}: {exc}")
            details = str(exc)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        except Exception as exc:  # the handler's error goes back to the server as this site's failure
            _log.error(f"[mrsfm] task failed: {type(exc).__name__}: {exc}")
            details = f"{type(exc).__name__}: {exc}"
            if "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
                self.poisoned = str(exc).splitlines()[0][:200]
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details[:500]),
                                reply_to=message)
        finally:
            if beat is not None and beat.is_running:  # before the task output, which ends the token
                beat.stop()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except BaseException as exc:  # the SuperNode ended the task: the round fails there, not here
                _log.error(f"[mrsfm] could not return the reply: {type(exc).__name__}: {exc}")
            t.append(time.perf_counter())
            client.close()
            self.served += 1
            _log.debug("[mrsfm] task: pull %s, run %s, push %s",
                       *(f"{b - a:.2f} s" for a, b in zip(t, t[1:])) if len(t) == 4 else ("?",) * 3)


def _pull_task_input(client, backoff_s: float = 0.05):
    """Flower's pull_task_input (flwr.supernode.runtime.run_clientapp, 1.41) with a short retry: the
    task is handed out as soon as the SuperNode has the message, often before it has pulled the
    weights from the SuperLink, and Flower's first retry waits 1 s, then 2 s (3 s of every round)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    res = client.PullTaskInput(PullTaskInputRequest())
    context, fab = context_from_proto(res.context), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message from the SuperNode's Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=backoff_s, backoff_cap=2.0,
        max_tries_per_object=None)  # bounded by Flower's max_time (2 h), as its own executor is
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: the id is not in the tree
    return message, context, fab


def _retries(tries: int):
    """Retries of connection errors only, without Flower's HTTP invoker's SIGINT to its own process on
    HTTP 401 (a refused secret, or a task token the SuperNode revoked), which would stop the worker."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(lambda: exponential(max_delay=2.0), httpx.TransportError, max_tries=tries, max_time=None)


def _heartbeat(client) -> Callable[[], bool]:
    """Flower's task heartbeat without its SIGINT on a cancelled task (which would stop the worker);
    the client's own retries (`_retries`) do not signal either."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    return beat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--secret-file", help="the SuperExec secret shared with flower-supernode")
    parser.add_argument("--trusted-app", action="append", default=[], help="SHA-256 of an app bundle to serve "
                        "besides those whose client code equals the installed one (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--state-dir", help="the site's state folder: one worker per folder (a lock file in it)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the site launcher) is gone")
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    if args.parent_pid:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    try:
        lock = hold_state_dir(Path(args.state_dir).expanduser()) if args.state_dir else None
        secret = Path(args.secret_file).read_bytes() if args.secret_file else None
        worker = SiteWorker(args.runtime_api_address, secret, args.trusted_app)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.stopping.set())
        t0 = time.time()
        worker.serve_forever()
    except (WorkerConflict, OSError) as exc:  # the launcher stops: restarting would not help
        _log.error(f"[mrsfm] site worker: {exc}")
        return EXIT_CONFLICT
    except DeviceBroken as exc:  # the launcher restarts it
        _log.error(f"[mrsfm] site worker: {exc}")
        return 4
    del lock
    _log.info(f"[mrsfm] site worker stopped after {worker.served} task(s) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
