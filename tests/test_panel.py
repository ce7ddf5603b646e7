"""The comparison panel scores the pretrained model's own quantifier (its latent head) beside the probe."""

import pytest
import torch

from mrsfm_model.config import load_config
from mrsfm_model.evaluation.networks import RANDOM_INIT
from mrsfm_model.evaluation.panel import Panel
from mrsfm_model.model.export import shipped


@pytest.fixture(scope="module")
def panel():
    cfg = load_config(["device=cpu", "finetune.seeds=[0,1]", "finetune.label_sizes=[12]"])
    return Panel(cfg, torch.device("cpu"), ("vendor", "quant"), subjects_per_vendor=12, log=lambda m: None)


def test_head_modes_score_quantification_only_and_only_with_a_head(panel):
    rows = panel.score(shipped(), ("head", "head_cal"))
    assert {(r["task"], r["mode"]) for r in rows} == {("quant", "head"), ("quant", "head_cal")}
    head = next(r for r in rows if r["mode"] == "head")
    # no labels: every seed scores the same test set with the same estimates
    assert head["per_seed"][0] == head["per_seed"][1] and head["metrics"]["r2_NAA/tCr"]["ci95"] == 0
    assert head["metrics"]["r2_NAA/tCr"]["mean"] > 0.5  # the shipped head quantifies NAA/tCr well (README)
    cal = next(r for r in rows if r["mode"] == "head_cal")
    assert cal["per_seed"][0] != cal["per_seed"][1]  # a line fitted on each seed's own labelled sample
    assert panel.score(RANDOM_INIT, ("head", "head_cal")) == []  # no head at initialisation
    assert panel.score(None, ("head",)) == []
