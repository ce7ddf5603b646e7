"""`mrsfm` subcommands of the federation (entry points `mrsfm.commands` in pyproject.toml), so the
science package's CLI never imports server/. Each module loads only when its command runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def demo(subs: argparse._SubParsersAction) -> None:
    """`mrsfm demo [--out DIR] [--rounds N] [overrides]`: server/demo.py."""
    p = subs.add_parser("demo", help="local federation (SuperLink + 3 SuperNodes) + fine-tune, on shipped files")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from server.demo import run_demo

    run_demo(args.out, overrides, rounds=args.rounds)
    return 0
