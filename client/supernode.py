"""`flower-supernode` with the idle waits a site chooses (`site.poll_s`), as the launcher runs it.

Flower 1.41's SuperNode sleeps a fixed 3 s after every pull that finds no message, 0.5 s at a time
while it waits for its ClientApp's reply, and backs off from 1 s when a message's content is not on
the SuperLink yet; none of it is an option. After a site sends its update it asks at once for the
next round's message, finds none (the server is still aggregating) and sleeps the 3 s out, so a
small model's round lasted ~8 s for ~0.2 s of training. This entry point caps the sleeps of Flower's
SuperNode loop (`flwr.supernode.start_client_internal`, that module alone: heartbeats and
connection retries keep their own timing) and the first back-off at MRSFM_SUPERNODE_POLL_S seconds,
then runs Flower's own `flower_supernode()` with the same arguments. If this Flower does not have
that layout, it says so on stderr and runs unchanged.

It also makes the SuperNode's leave survive a second stop signal. On SIGTERM/SIGINT Flower's SuperNode
deactivates and unregisters its node on the SuperLink, after putting back the handlers it found at
start; with Python's defaults there, a second signal during that leave (systemd or a test signalling
the whole process group and the launcher forwarding its own SIGTERM; Ctrl-C reaching both) killed it
half-way, and the SuperLink kept a ghost node that every later round waited for until its deadline.

    MRSFM_SUPERNODE_POLL_S=0.5 python -m client.supernode --superlink HOST:PORT ...
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import types

ENV = "MRSFM_SUPERNODE_POLL_S"


def capped_time(cap_s: float) -> types.SimpleNamespace:
    """A stand-in for the `time` module whose sleep never exceeds cap_s."""
    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
    return types.SimpleNamespace(**{**names, "sleep": lambda s: time.sleep(min(float(s), cap_s))})


def shorten_waits(cap_s: float) -> bool:
    """Cap the SuperNode loop's sleeps and first pull back-off; False (nothing changed) when this
    Flower's SuperNode module lacks what is patched."""
    import flwr.supernode.start_client_internal as loop

    if not (isinstance(getattr(loop, "time", None), types.ModuleType) and callable(getattr(loop, "pull_objects", None))):
        return False
    loop.time = capped_time(cap_s)
    loop.pull_objects = functools.partial(loop.pull_objects, initial_backoff=cap_s)
    return True


def _ignore(_signum: int, _frame: object) -> None:
    """A Python handler, not SIG_IGN: processes the SuperNode starts get the default back at exec."""


def leave_once() -> None:
    """Ignore SIGTERM/SIGINT until Flower's SuperNode installs its own handlers: these are what it
    puts back when the first signal starts its leave, so a second one cannot cut the leave short
    (the launcher kills a SuperNode that has not left within its grace period)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)


def main() -> None:
    leave_once()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = os.environ.get(ENV)
    if cap and not shorten_waits(float(cap)):
        print(f"client.supernode: this Flower's SuperNode has another layout; {ENV} is ignored (Flower's own "
              "3 s idle wait applies)", file=sys.stderr, flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
