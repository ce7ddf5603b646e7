"""Hydra composition without @hydra.main, so servers, clients and the CLI share one config tree.

Models and simulators never import Hydra or OmegaConf: they read configs through here
(`load_config`, `read_composed`, `read_yaml`, `plain`) and take the typed dataclasses built with
`from_section` / `ConfigSection`."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
RESOURCES = Path(__file__).resolve().parent / "resources"  # what the package ships: basis sets, encoders


def release_config_dir() -> Path | None:
    """The configs/ this installation carries (an installed wheel's mrsfm_model/configs, else the
    checkout's beside the package), whatever MRSFM_CONFIG_DIR says; None if neither has one."""
    here = Path(__file__).resolve().parent
    return next((p for p in (here / "configs", here.parent / "configs") if (p / "config.yaml").is_file()), None)


def config_dir() -> Path:
    """`configs/`: MRSFM_CONFIG_DIR (e.g. a site's own copy), else the copy an installed wheel
    carries (mrsfm_model/configs), else the checkout's, beside the package."""
    env = os.environ.get("MRSFM_CONFIG_DIR")
    here = Path(__file__).resolve().parent
    candidates = [Path(env)] if env else [here / "configs", here.parent / "configs"]
    for path in candidates:
        if (path / "config.yaml").is_file():
            return path
    raise FileNotFoundError(f"{candidates[0]}: no config.yaml here; set MRSFM_CONFIG_DIR to a configs folder "
                            "or reinstall mrsfm")


def config_names(group: str) -> list[str]:
    """The choices of a config group (configs/<group>/*.yaml), leaving out the files the others
    share (`_common.yaml`): e.g. the sites that `python -m client --site` knows."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def load_config(overrides: Sequence[str] = (), name: str = "config") -> DictConfig:
    """Compose `configs/<name>.yaml` with Hydra overrides like `data.batch_size=8`."""
    return _compose(config_dir(), name, overrides, f"bad config override {list(overrides)}")


def read_composed(path: Path) -> dict:
    """A YAML file composed by Hydra with the files its `defaults:` list names beside it (a
    simulation profile, given by name or by a path anywhere), as plain resolved containers."""
    return _compose(path.parent.resolve(), path.stem, (), str(path), resolved=True)


def read_yaml(path: Path) -> dict:
    """A YAML file that composes nothing (e.g. configs/simulation/_cohort.yaml), as plain resolved containers."""
    return plain(OmegaConf.load(path))


def _compose(directory: Path, name: str, overrides: Sequence[str], context: str, resolved: bool = False):
    """The one Hydra composition: a bad file or override is one ValueError line led by `context`.
    `resolved`: plain containers, resolved inside so a bad interpolation is reported the same way."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        try:
            cfg = compose(config_name=name, overrides=list(overrides))
            return OmegaConf.to_container(cfg, resolve=True) if resolved else cfg
        except (HydraException, OmegaConfBaseException) as exc:
            raise ValueError(f"{context}: {exc}".splitlines()[0]) from None


# Settings that belong to a site alone: its privacy and where its private data are. A coordinator's
# override of any of them is refused (by the ServerApp when a run is submitted, and by every site).
SITE_OWNED = ("privacy", "data.invivo_dir")


def site_owned_keys(overrides: Sequence[str]) -> list[str]:
    """The keys among Hydra override words (`privacy.delta=0.5`, `+privacy.x=1`, `privacy=other`,
    `~data.invivo_dir`) that only a site may set."""
    keys = [w.split("=", 1)[0].lstrip("+~") for w in overrides]
    return [k for k in keys if any(k == o or k.startswith(o + ".") for o in SITE_OWNED)]


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` picks the GPU when there is one, else the CPU (torch imported here: the site
    launcher reads configs without paying for it)."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_section(path: str):
    """One section (dotted path, e.g. `data.grid`) of the default composition of `configs/`: the
    only place a default value lives. Cached per configs folder (composition costs ~0.1 s)."""
    return OmegaConf.select(_default_config(str(config_dir())), path)


@functools.lru_cache(maxsize=4)
def _default_config(directory: str) -> DictConfig:
    cfg = load_config()
    OmegaConf.set_readonly(cfg, True)
    return cfg


def plain(value: Any) -> Any:
    """A DictConfig / ListConfig as resolved dicts and lists; anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (float, int, bool, str, X | None, tuple[X, Y], tuple[X, ...], Any);
    ValueError where it is not one (a string for a number, a number for a bool)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if value is None:
        raise ValueError
    if origin is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else None
        if items is None:
            raise ValueError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in items)
        if len(items) != len(args):
            raise ValueError
        return tuple(_coerce(v, a) for v, a in zip(items, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if hint in (int, float):
        if isinstance(value, (str, bool)) or (hint is int and float(value) != int(value)):
            raise ValueError
        return hint(value)
    if hint is str:
        if isinstance(value, (list, tuple, dict)):
            raise ValueError
        return str(value)
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def from_section(cls, cfg: Mapping, section: str):
    """Dataclass `cls` from a config mapping. Every field must be present (the YAML is the one source
    of defaults, so a missing key is a bug, not a fallback) and each value is checked against the
    field's type, so `hop=abc` fails with the key's name instead of deep inside a kernel."""
    hints = typing.get_type_hints(cls)
    kwargs, missing = {}, []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name not in cfg:
            missing.append(f.name)
            continue
        value = plain(cfg[f.name])
        try:
            kwargs[f.name] = _coerce(value, hints[f.name])
        except (TypeError, ValueError):
            raise ValueError(f"config {section}.{f.name}: expected {_type_name(hints[f.name])}, got {value!r}") from None
    if missing:
        raise ValueError(f"config {section}: missing {', '.join(missing)}")
    return cls(**kwargs)


class ConfigSection:
    """Dataclass mixin for settings read from one section of `configs/` (SECTION, dotted).

    The dataclass carries types and validation; its values come from the YAML: keys absent from
    `cfg` (and `cfg=None` altogether) take the YAML's defaults, `overrides` win over both.
    """

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_config(cls: type[T], cfg: Mapping | None = None, **overrides: Any) -> T:
        merged = {**dict(plain(default_section(cls.SECTION)) or {}), **dict(plain(cfg) or {}), **overrides}
        out = from_section(cls, merged, cls.SECTION)
        out.check()
        return out

    def check(self) -> None:
        """Raise ValueError naming the key when a value is out of range (override per class)."""
