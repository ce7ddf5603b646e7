"""The Flower app bundle a run ships to the SuperLink: pyproject.toml (the app manifest) and the files
its `fab-include` names, staged from wherever the package is installed; run-config values in the
syntax Flower parses."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # holds server/ and client/: the checkout, or site-packages


def app_manifest() -> Path:
    """The Flower app's pyproject.toml: the checkout's, or the copy a wheel installs in PREFIX/share/mrsfm."""
    for path in (ROOT / "pyproject.toml", Path(sys.prefix) / "share" / "mrsfm" / "pyproject.toml"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no pyproject.toml beside {ROOT} nor in {Path(sys.prefix) / 'share' / 'mrsfm'}; "
                            "reinstall mrsfm")


def stage_app(out_dir: str | Path) -> Path:
    """The Flower app (pyproject.toml + the files its fab-include names) copied to OUT/app/mrsfm.

    `flwr run DIR` walks every file under DIR before filtering (the repository's .venv included:
    ~45k files, ~5 CPU-seconds per run); the copy gives the same FAB in a fraction of that."""
    dst = Path(out_dir) / "app" / "mrsfm"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    manifest = app_manifest()
    shutil.copy2(manifest, dst / "pyproject.toml")
    patterns = tomllib.loads(manifest.read_text())["tool"]["flwr"]["app"]["fab-include"]
    for pattern in patterns:
        for f in ROOT.glob(pattern):
            (dst / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.relative_to(ROOT))
    return dst


def _toml(value) -> str:
    """A run-config / node-config value as Flower parses it ('literal' strings, no escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if "'" in str(value):
        raise ValueError(f"value {value!r} must not contain a single quote")
    return f"'{value}'"


def run_config_arg(values: dict) -> str:
    return " ".join(f"{k}={_toml(v)}" for k, v in values.items())
