"""`mrsfm demo` as the README runs it: continued federated pretraining from the shipped model on
loopback, then the fine-tune table; its loss must fall and its table must carry every arm."""

import json

from server.demo import run_demo


def test_demo_learns_from_the_shipped_model_and_reports_every_arm(tmp_path):
    logs: list[str] = []
    summary = run_demo(tmp_path / "demo", log=logs.append)
    assert summary["rounds"] == 3 and summary["init"] == "shipped"
    assert summary["final_loss"] <= 0.9 * summary["first_loss"], summary  # at least 10 % lower over the rounds
    server_log = (tmp_path / "demo" / "logs" / "flwr_run.log").read_text()
    assert "round 1 starts from" in server_log and "mrsfm_micro.mae.safetensors" in server_log
    result = json.loads((tmp_path / "demo" / "finetune.json").read_text())
    arms = {(r["init"], r["mode"]) for r in result["rows"]}
    assert {("pretrained", "full"), ("random_init", "full"), ("scratch", "full"),
            ("baseline", "spectrum"), ("baseline", "pixels")} <= arms
    assert {p["minus"] for p in result["paired"]} >= {"random_init full", "scratch full", "baseline pixels"}
    for name in ("training_curve.png", "reconstruction.png", "finetune.png", "summary.json"):
        assert (tmp_path / "demo" / name).is_file(), name
