"""`mrsfm compare`: the arms, their sites and data, the paired report, and one small run end to end."""

from __future__ import annotations

import json

import pytest

from mrsfm_model.config import config_names, load_config
from mrsfm_model.data.simulate import load_profile
from server.compare import CompareConfig, comparisons, config_folder, plan_arms, write_configs

SMALL = ["compare.rounds=2", "compare.steps_per_round=6", "compare.batch_size=8", "compare.private_spectra=4",
         "compare.seeds=[0,1]", "compare.label_sizes=[12]", "compare.subjects_per_vendor=12",
         "compare.lovo_subjects=24"]


def settings(*over: str) -> CompareConfig:
    return CompareConfig.from_config(load_config(list(over)).compare)


def test_every_arm_trains_on_the_same_samples_and_lovo_arms_never_hold_their_vendor():
    c = settings()
    arms = plan_arms(c)
    names = [a.name for a in arms]
    assert {"centralized", "federated_fedavg", "federated_fedprox", "federated_fedadam", "single_ge",
            "dp_eps1", "dp_eps8", "hetero_fedavg", "hetero_fedmedian", "lovo_ge_federated"} <= set(names)
    for a in arms:  # local steps x sites: the same total in every arm
        assert c.steps_per_round // len(a.sites) * len(a.sites) == c.steps_per_round
    for a in (a for a in arms if a.held_out):
        for s in a.sites:
            assert a.held_out not in s.vendors
            assert not any(p.endswith(a.held_out.lower()) for p in s.profiles())
    hetero = next(a for a in arms if a.name == "hetero_fedavg")
    assert [s.private for s in hetero.sites] == [48, 14, 5] and [s.noisy for s in hetero.sites] == [False, False, True]


def test_gpu_scale_is_a_valid_larger_comparison():
    c = settings("compare=gpu")
    small = settings()
    assert c.model == "small" and c.rounds > small.rounds and c.private_spectra > small.private_spectra
    assert set(c.modes) == {"linear", "full", "head", "head_cal"} and len(c.seeds) == 10
    held = {a.held_out for a in plan_arms(c) if a.group == "lovo"}
    assert held == {"GE", "Philips", "Siemens"}


def test_bad_settings_are_one_line_naming_the_key():
    with pytest.raises(ValueError, match="compare.steps_per_round"):
        settings("compare.steps_per_round=100")
    with pytest.raises(ValueError, match="compare.lovo: unknown vendor 'Bruker'"):
        settings("compare.lovo=[Bruker]")
    with pytest.raises(ValueError, match="unknown arm 'federated'"):
        plan_arms(settings("compare.arms=[federated]"))


def test_site_configs_carry_the_vendor_mix_dp_and_a_noisier_profile(tmp_path):
    c = settings()
    arms = {a.name: a for a in plan_arms(c)}
    folder = write_configs(arms["hetero_fedavg"], c, tmp_path / "het")
    with config_folder(folder):
        noisy = load_profile("press_siemens_noisy")
        assert noisy.vendor == "Siemens" and noisy.snr == (3.0, 15.0)
        assert load_profile("press_siemens").snr == (15.0, 150.0)
    site = (folder / "site" / "siemens.yaml").read_text()
    assert "press_siemens_noisy" in site and "privacy" not in site
    with config_folder(folder):  # the arm's site file still takes what every site shares
        siemens = load_config(["+site=siemens"]).site
        assert siemens.name == "siemens" and siemens.worker is True and siemens.poll_s == 0.5
        assert siemens.overrides == ["data.sim_profiles=[press_siemens_noisy,megapress_siemens_noisy]"]
        assert config_names("site") == ["einstein", "ge", "hcfmrp", "philips", "siemens", "unicamp"]  # not _common
    dp = write_configs(arms["dp_eps3"], c, tmp_path / "dp")
    assert "privacy.target_epsilon=3.0" in (dp / "site" / "ge.yaml").read_text()


def _scores(values: dict[str, list[float]]) -> dict:
    return {arm: [{"task": "vendor", "mode": "linear", "n_labels": 12, "metrics": {"accuracy": {"mean": sum(v) / 2}},
                   "per_seed": [{"accuracy": x} for x in v]}] for arm, v in values.items()}


def test_paired_differences_and_targets_from_scores():
    c = settings("compare.label_sizes=[12]", "compare.seeds=[0,1]", "compare.lovo=[]")
    arms = [{"arm": a, "group": g} for a, g in (("federated_fedavg", "federated"), ("centralized", "centralized"),
                                               ("single_ge", "single"), ("single_philips", "single"),
                                               ("dp_eps8", "privacy"))]
    scores = _scores({"federated_fedavg": [0.8, 0.9], "centralized": [0.9, 0.9], "single_ge": [0.5, 0.7],
                      "single_philips": [0.6, 0.7], "dp_eps8": [0.8, 0.85], "random_init": [0.4, 0.4]})
    pairs, targets = comparisons(scores, arms, c)
    vs = {(p["arm"], p["minus"]): p for p in pairs if p["task"] == "vendor"}
    assert vs[("federated_fedavg", "centralized")]["per_seed"] == pytest.approx([-0.1, 0.0])
    assert vs[("federated_fedavg", "centralized")]["ratio"] == pytest.approx(0.85 / 0.9)
    assert ("federated_fedavg", "single_philips") in vs and ("federated_fedavg", "single_ge") not in vs  # best single
    assert vs[("dp_eps8", "federated_fedavg")]["mean"] == pytest.approx(-0.025)
    assert not targets["federated_vs_centralized"]["met"] and targets["dp_cost_at_eps_le_8"]["met"]


@pytest.mark.slow
def test_compare_end_to_end_on_local_federations(tmp_path):
    from server.compare import run_compare

    arms = ["centralized", "single_philips", "lovo_ge_federated"]
    result = run_compare(tmp_path, [*SMALL, f"compare.arms=[{','.join(arms)}]", "compare.modes=[linear]"])
    expected = 2 * 6 * 8  # rounds x steps per round x batch
    for arm in arms:  # from the ServerApp's own metrics of each run
        rows = [json.loads(x) for x in (tmp_path / "arms" / arm / "run" / "metrics.jsonl").read_text().splitlines()]
        assert sum(s["num_examples"] for r in rows for s in r["sites"]) == expected
        assert {s["site"] for r in rows for s in r["sites"]} == {
            "centralized": {"pooled"}, "single_philips": {"philips"}, "lovo_ge_federated": {"philips", "siemens"}}[arm]
    # leave-GE-out: neither the sites' simulated profiles nor their private files are GE's
    lovo = tmp_path / "arms" / "lovo_ge_federated"
    for site in ("philips", "siemens"):
        assert "_ge" not in (lovo / "configs" / "site" / f"{site}.yaml").read_text()
    for site in json.loads((lovo / "arm.json").read_text())["sites"]:
        files = list((tmp_path / "data").glob(f"{site['name']}_*/*.json"))
        assert files and all(json.loads(f.read_text())["vendor"] != "GE" for f in files)
    assert {a["arm"]: a["samples"] for a in result["arms"]} == dict.fromkeys(arms, expected)
    tasks = {name: {r["task"] for r in rows} for name, rows in result["scores"].items()}
    assert tasks["lovo_ge_federated"] == tasks["single_philips"] == tasks["random_init"] == {"vendor", "quant", "lovo_GE"}
    assert tasks["centralized"] == {"vendor", "quant"}  # it saw GE
    assert set(result["baselines"]) == {"pixels", "spectrum"}
    assert "lovo_GE_federated_vs_best_single" in result["targets"]
    kinds = {json.loads(x)["kind"] for x in (tmp_path / "compare.jsonl").read_text().splitlines()}
    assert kinds == {"arm", "score", "paired", "target"}
    assert "| lovo_ge_federated | 96 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    # a second start reuses every finished arm and score, and scores only the modes added (the default
    # adds the pretrained model's own quantifier: its latent head, quantification tasks only)
    again = run_compare(tmp_path, [*SMALL, f"compare.arms=[{','.join(arms)}]"])
    assert [a["seconds"] for a in again["arms"]] == [a["seconds"] for a in result["arms"]]
    for name, rows in result["scores"].items():
        assert [r for r in again["scores"][name] if r["mode"] == "linear"] == rows
    modes = {name: {(r["task"], r["mode"]) for r in rows if r["mode"] != "linear"} for name, rows in again["scores"].items()}
    assert modes["centralized"] == {("quant", "head"), ("quant", "head_cal")}
    assert modes["lovo_ge_federated"] == {(t, m) for t in ("quant", "lovo_GE") for m in ("head", "head_cal")}
    assert modes["random_init"] == modes["scratch"] == set()
    assert any(p["mode"] == "head" and p["task"] == "lovo_GE" and p["minus"] == "single_philips" for p in again["paired"])
    assert "Downstream (head;" in (tmp_path / "compare.md").read_text()
    with pytest.raises(ValueError, match=r"scores/centralized.json: made with other compare settings \(seeds\)"):
        run_compare(tmp_path, [*SMALL, f"compare.arms=[{','.join(arms)}]", "compare.seeds=[0,2]"])
    with pytest.raises(ValueError, match=r"arm.json: made with other compare settings \(rounds\)"):
        run_compare(tmp_path, [*SMALL, f"compare.arms=[{','.join(arms)}]", "compare.rounds=3"])
