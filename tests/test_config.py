"""One source of defaults: configs/ (and pyproject's run config) hold every value; the dataclasses
carry types and validation only, and building a config from code or from the YAML is the same."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mrsfm_model.config import ConfigSection, default_section, load_config
from mrsfm_model.data.canonical import CanonicalGrid
from mrsfm_model.data.quality import QualityConfig
from mrsfm_model.data.simulate import SimProfile, load_profile
from mrsfm_model.data.spectrogram import SpectrogramConfig
from mrsfm_model.evaluation.finetune import FinetuneConfig, FinetuneGrid
from mrsfm_model.evaluation.study_data import StudyConfig
from mrsfm_model.model.mae import MAEConfig, configured_mae, mae_config
from mrsfm_model.training.privacy import DPConfig
from mrsfm_model.training.trainer import OptimConfig
from server.app import RunSettings
from server.compare import CompareConfig
from server.validate import ValidationSettings

SECTIONS = [OptimConfig, FinetuneConfig, FinetuneGrid, DPConfig, SpectrogramConfig, CanonicalGrid, StudyConfig, ValidationSettings,
            QualityConfig, CompareConfig]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", SECTIONS + [MAEConfig, SimProfile, RunSettings], ids=lambda c: c.__name__)
def test_no_dataclass_carries_a_competing_default(cls):
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_built_from_code_equals_built_from_the_yaml(cls):
    yaml = OmegaConf.select(load_config(), cls.SECTION)
    from_yaml = {f.name: yaml[f.name] for f in dataclasses.fields(cls)}
    assert dataclasses.asdict(cls.from_config()) == dataclasses.asdict(cls.from_config(from_yaml))
    for name, value in dataclasses.asdict(cls.from_config()).items():
        expected = OmegaConf.to_container(yaml[name]) if OmegaConf.is_config(yaml[name]) else yaml[name]
        assert value == (tuple(expected) if isinstance(value, tuple) else expected), name


def test_partial_mappings_and_overrides_take_the_rest_from_the_yaml():
    grid = CanonicalGrid.from_config({"points": 1024}, remove_water=False)
    assert (grid.points, grid.remove_water, grid.bandwidth_hz) == (1024, False, default_section("data.grid").bandwidth_hz)
    with pytest.raises(ValueError, match=r"config data.spectrogram.hop: expected int, got 'abc'"):
        SpectrogramConfig.from_config(hop="abc")
    with pytest.raises(ValueError, match=r"config train.amp"):
        OptimConfig.from_config(amp="fp8")
    grid = FinetuneGrid.from_config(load_config(["finetune.seeds=[3,4]", "finetune.label_sizes=[10]"]).finetune)
    assert (grid.seeds, grid.label_sizes, grid.tasks) == ((3, 4), (10,), tuple(default_section("finetune.tasks")))
    with pytest.raises(ValueError, match=r"config finetune.seeds: expected tuple.*, got \['a'\]"):
        FinetuneGrid.from_config(load_config(["finetune.seeds=[a]"]).finetune)


def test_every_model_size_is_its_yaml_and_unknown_model_keys_are_refused():
    for size in ("micro", "tiny", "small", "base", "large"):
        cfg = load_config([f"model={size}"])
        mae = mae_config(size)
        assert (mae.embed_dim, mae.depth, mae.patch_size) == (cfg.model.embed_dim, cfg.model.depth,
                                                              tuple(cfg.model.patch_size))
        assert mae.img_size == (cfg.data.spectrogram.height, cfg.data.spectrogram.width)
    cfg = load_config(["+model.mask_ration=0.5"])
    with pytest.raises(ValueError, match=r"config model: unknown key mask_ration; known: .*mask_ratio"):
        configured_mae(cfg.model, cfg.data)


def test_run_settings_come_from_pyproject_and_a_missing_key_is_named():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    s = RunSettings.from_run_config(table)
    assert (s.num_rounds, s.strategy) == (table["num-rounds"], table["strategy"])
    with pytest.raises(ValueError, match="config run config: missing num_rounds"):
        RunSettings.from_run_config({k: v for k, v in table.items() if k != "num-rounds"})


def test_simulation_profiles_use_hydras_defaults_list(tmp_path):
    common = OmegaConf.load(ROOT / "configs" / "simulation" / "_common.yaml")
    ge = load_profile("megapress_ge")
    assert ge.snr == tuple(common.snr) and ge.mm_scale == (1.0, 4.0)  # shared, and its own override
    (tmp_path / "_common.yaml").write_text((ROOT / "configs" / "simulation" / "_common.yaml").read_text())
    (tmp_path / "mine.yaml").write_text("defaults:\n  - _common\n  - _self_\nbasis: x\nsnr: [5, 6]\n")
    mine = load_profile(tmp_path / "mine.yaml")
    assert mine.snr == (5.0, 6.0) and mine.lorentzian_hz == tuple(common.lorentzian_hz) and mine.name == "mine"
    (tmp_path / "bare.yaml").write_text("basis: x\n")
    with pytest.raises(ValueError, match=r"simulation profile bare: missing keys \[.*'snr'"):
        load_profile(tmp_path / "bare.yaml")
    # a broken file is one line naming it, whether its defaults list or an interpolation fails
    (tmp_path / "lost.yaml").write_text("defaults:\n  - _nosuch\n  - _self_\nbasis: x\n")
    with pytest.raises(ValueError, match=r"lost\.yaml: .*Could not load '_nosuch'") as lost:
        load_profile(tmp_path / "lost.yaml")
    (tmp_path / "loose.yaml").write_text("basis: ${nope}\n")
    with pytest.raises(ValueError, match=r"loose\.yaml: Interpolation key 'nope' not found") as loose:
        load_profile(tmp_path / "loose.yaml")
    assert "\n" not in str(lost.value) + str(loose.value)
    with pytest.raises(ValueError, match=r"^bad config override \['data\.nosuch=1'\]: Could not override"):
        load_config(["data.nosuch=1"])


def test_config_sections_are_all_tested():
    assert {c.__name__ for c in ConfigSection.__subclasses__()} == {c.__name__ for c in SECTIONS}
