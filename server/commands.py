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


def compare(subs: argparse._SubParsersAction) -> None:
    """`mrsfm compare [--out DIR] [--scale small|gpu] [--arms a,b] [overrides]`: server/compare.py."""
    p = subs.add_parser("compare", help="does federation pay? federated vs centralized vs single-site pretraining, "
                                        "DP at several epsilons, leave-one-vendor-out (local federations)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--scale", choices=("small", "gpu"), default="small",
                   help="small: configs/compare/default.yaml (2 CPU cores, ~1 h); gpu: configs/compare/gpu.yaml")
    p.add_argument("--arms", default=None, help="comma-separated arm names (default: every arm)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from server.compare import run_compare

    words = (["compare=gpu"] if args.scale == "gpu" else []) + list(overrides)
    if args.arms:
        words.append(f"compare.arms=[{args.arms}]")
    run_compare(args.out, words)
    return 0
