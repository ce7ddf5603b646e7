"""Monitoring of a run: one progress bar to the total steps across checkpoint chunks, and TensorBoard
events beside metrics.jsonl (switchable off)."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mrsfm_model.config import load_config
from mrsfm_model.training.pretrain import run_pretrain

TINY = ["model=micro", "train.steps=4", "train.checkpoint_every=2", "train.log_every=2", "data.batch_size=4",
        "data.sim_profiles=[press_ge]", "device=cpu"]


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_pretraining_writes_tensorboard_beside_metrics_and_one_bar_to_the_total(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_pretrain(load_config([*TINY, f"run_dir={run_dir}"]), log=lambda _: None)
    err = capsys.readouterr().err
    assert "4/4" in err and "2/2" not in err  # the bar counts the run, not each checkpoint chunk
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows] == [2, 4]
    assert all(abs(v - r["loss"]) < 1e-5 for (_, v), r in zip(scalars["train/loss"], rows))
    assert {"train/lr", "train/grad_norm"} <= set(scalars)


def test_tensorboard_can_be_switched_off(tmp_path):
    run_dir = tmp_path / "run"
    run_pretrain(load_config([*TINY, "train.steps=2", f"run_dir={run_dir}", "train.tensorboard=false"]),
                 log=lambda _: None)
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "tensorboard").exists()
