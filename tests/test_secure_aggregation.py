"""Secure aggregation (fl.secure_aggregation=true): the settings and their refusals."""

from __future__ import annotations

import pytest

from mrsfm_model.config import load_config
from server.secure import check_run


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Messages made here are made as in a ServerApp (Flower reads the run and node from its task)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def fl(**secagg) -> dict:
    cfg = load_config(["+fl=fedavg", "fl.secure_aggregation=true",
                       *(f"fl.secagg.{k}={v}" for k, v in secagg.items())])
    return cfg.fl


# -- settings and refusals ----------------------------------------------------------------------------


def test_off_by_default_in_every_strategy():
    for name in ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"):
        cfg = load_config([f"+fl={name}"])
        assert cfg.fl.secure_aggregation is False and check_run(cfg.fl, name, 2, 3) is None


def test_defaults_protect_3_to_20_sites_and_tolerate_a_dropout():
    s = check_run(fl(), "fedavg", 3, 20)
    for n in range(3, 21):
        shares, t = s.resolve(n)
        assert shares == n and 2 * t > shares and shares - t >= 1, (n, shares, t)
    assert s.step == pytest.approx(2 * 10.0 / 2**22)


@pytest.mark.parametrize("settings,strategy,min_sites,expected,needle", [
    ({}, "fedavg", 2, 3, "fl.secure_aggregation=true needs at least 3 sites per round"),
    ({}, "fedmedian", 3, 3, "fl.secure_aggregation=true needs an averaging strategy"),
    ({"reconstruction_threshold": 0.5}, "fedavg", 4, 4, "fl.secagg.reconstruction_threshold 0.5 is 2 of 4 shares"),
    ({"reconstruction_threshold": 0.4}, "fedprox", 5, 5, "not more than half"),
    ({"num_shares": 5}, "fedavg", 3, 3, "fl.secagg.num_shares 5 is 5 shares, more than the 3 sites"),
    ({"num_shares": 5, "reconstruction_threshold": 4}, "fedavg", 3, 6, "more than the 3 sites"),
    ({"reconstruction_threshold": 6}, "fedavg", 3, 5, "fl.secagg.reconstruction_threshold 6 is 6 shares"),
    ({"modulus_range": 2**24}, "fedavg", 3, 5, "allows at most 3 sites"),
])
def test_a_threshold_that_cannot_protect_is_refused_in_one_line(settings, strategy, min_sites, expected, needle):
    with pytest.raises(ValueError) as err:
        check_run(fl(**settings), strategy, min_sites, expected)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("key,value,needle", [
    ("update_norm_bound", 0, "fl.secagg.update_norm_bound must be > 0"),
    ("modulus_range", 3000000000, "fl.secagg.modulus_range must be a power of 2"),
    ("num_shares", 2.5, "fl.secagg.num_shares must be a fraction"),
    ("reconstruction_threshold", "abc", "fl.secagg.reconstruction_threshold must be a number"),
])
def test_bad_values_are_refused_naming_the_setting(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        check_run(fl(**{key: value}), "fedavg", 3, 3)


def test_the_server_refuses_the_run_before_writing_anything(tmp_path, monkeypatch):
    from server.app import RunSettings, run_federation

    monkeypatch.chdir(tmp_path)
    s = RunSettings(overrides="model=micro fl.secure_aggregation=true fl.secagg.reconstruction_threshold=0.5",
                    num_rounds=1, local_steps=1, run_dir="run", min_sites=4, wait_timeout_s=1.0, wire_dtype="bf16",
                    strategy="fedavg", sites="", round_timeout_s=10.0, local_sleep_s=0.0)
    with pytest.raises(ValueError, match="fl.secagg.reconstruction_threshold 0.5 is 2 of 4 shares"):
        run_federation(None, s)
    assert not (tmp_path / "run").exists()
