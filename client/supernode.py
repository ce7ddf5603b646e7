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

    MRSFM_SUPERNODE_POLL_S=0.5 python -m client.supernode --superlink HOST:PORT ...
"""

from __future__ import annotations

import functools
import os
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


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    cap = os.environ.get(ENV)
    if cap and not shorten_waits(float(cap)):
        print(f"client.supernode: this Flower's SuperNode has another layout; {ENV} is ignored (Flower's own "
              "3 s idle wait applies)", file=sys.stderr, flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
