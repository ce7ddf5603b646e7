"""The demo's and tests' three hospitals and their private data, from files the package ships."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from mrsfm_model.config import RESOURCES, config_dir
from mrsfm_model.data.simulate import write_simulated

SITES = ("unicamp", "hcfmrp", "einstein")
SHIPPED_INVIVO = RESOURCES / "examples" / "invivo"  # real Philips and Siemens spectra the package ships


def prepare_site_data(out_dir: str | Path, sites: Sequence[str] = SITES, n_simulated: int = 4) -> dict[str, Path]:
    """Each site's private in vivo folder: real Philips files for the 1st site, real Siemens for
    the 2nd, simulated in vivo-like GE PRESS as NIfTI-MRS for the 3rd (and so on in turn)."""

    out = Path(out_dir)
    folders = {}
    for i, site in enumerate(sites):
        folder = out / site
        if not folder.is_dir() or not any(folder.iterdir()):
            folder.mkdir(parents=True, exist_ok=True)
            if i % 3 == 2:
                write_simulated("press_ge", n_simulated, folder, seed=100 + i)
            else:
                src = SHIPPED_INVIVO / ("philips" if i % 3 == 0 else "siemens")
                for f in sorted(src.iterdir()):
                    shutil.copy2(f, folder / f.name)
        folders[site] = folder
    return folders


def copy_site_configs(folder: str | Path, names: Sequence[str], template: str = "unicamp") -> Path:
    """A copy of configs/ in `folder` with a site file for each of `names`: `template`'s, under the
    new name and its own state folder. Point MRSFM_CONFIG_DIR at it to run more sites on one
    machine than configs/site/ holds (bench/fl_load.py, tests)."""
    folder = Path(folder)
    shutil.copytree(config_dir(), folder, dirs_exist_ok=True)
    text = (folder / "site" / f"{template}.yaml").read_text()
    for name in names:
        (folder / "site" / f"{name}.yaml").write_text(
            text.replace(f"name: {template}", f"name: {name}").replace(f"/state/{template}", f"/state/{name}"))
    return folder
