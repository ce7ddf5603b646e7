"""ServerApp: federated MAE pretraining, one checkpoint and one metrics line per round, resumable.

Run config (`[tool.flwr.app.config]`, override with `flwr run . CONN --run-config 'k=v ...'`):
`overrides` (Hydra overrides of configs/, e.g. "model=micro data.batch_size=8"), `num-rounds`,
`local-steps`, `run-dir`, `min-sites`, `wait-timeout-s`, `wire-dtype` (bf16 | fp32), `strategy`
(fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg, settings in configs/fl/), `sites`
(expected site names, comma separated; empty: every configs/site/*.yaml), `round-timeout-s`,
`local-sleep-s` (benchmarks: sites sleep instead of training). Starting again with the same
run-dir continues after the last completed round. Outputs mirror `mrsfm pretrain`: config.yaml,
metrics.jsonl, training_curve.png, reconstruction.png, encoder.safetensors + encoder.json, plus
rounds/round_XXXX.safetensors.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from mrsfm_model.config import config_names, from_section, load_config, site_owned_keys
from mrsfm_model.data.stream import build_stream
from mrsfm_model.model.export import export_encoder, init_mae
from mrsfm_model.model.mae import build_mae
from mrsfm_model.model.weights import load_weights, save_weights
from mrsfm_model.model.wire import WIRE_DTYPES, as_fp32_record, to_state
from mrsfm_model.reports.cards import pretraining_card
from mrsfm_model.training.monitor import Scalars
from mrsfm_model.training.pretrain import plot_curve, plot_reconstructions

from .rundir import RunDir
from .secure import SecAggSettings, SecureOutcome, check_run, run_secure_rounds
from .strategy import STRATEGIES, make_strategy
from .transport import SitesMissingError, WireGrid

app = ServerApp()


@dataclass
class RunSettings:
    """`[tool.flwr.app.config]` of pyproject.toml (the one place their defaults live; Flower hands
    every key to the ServerApp), spelled with dashes there (num-rounds -> num_rounds)."""

    overrides: str
    num_rounds: int
    local_steps: int
    run_dir: str
    min_sites: int
    wait_timeout_s: float
    wire_dtype: str
    strategy: str
    sites: str
    round_timeout_s: float
    local_sleep_s: float

    @classmethod
    def from_run_config(cls, rc: Mapping) -> RunSettings:
        s = from_section(cls, {f.name: rc[f.name.replace("_", "-")] for f in fields(cls)
                               if f.name.replace("_", "-") in rc}, "run config")
        if s.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire-dtype must be one of {WIRE_DTYPES}, got {s.wire_dtype!r}")
        if s.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {s.strategy!r}")
        if s.num_rounds < 1 or s.local_steps < 1 or s.min_sites < 1:
            raise ValueError("num-rounds, local-steps and min-sites must be >= 1")
        if owned := site_owned_keys(shlex.split(s.overrides)):
            raise ValueError(f"overrides set {', '.join(owned)}: privacy settings and data paths belong to each "
                             "site (its configs/site/<site>.yaml); every site would refuse the run")
        root = run_root()
        if not (root / Path(s.run_dir).expanduser()).resolve().is_relative_to(root):
            raise ValueError(f"run-dir {s.run_dir} is outside {root}, where this SuperLink keeps its runs "
                             "(MRSFM_RUN_ROOT, else its working directory)")
        return s

    def expected_sites(self) -> list[str]:
        if self.sites.strip():
            return [x.strip() for x in self.sites.split(",") if x.strip()]
        return config_names("site")


def run_root() -> Path:
    """Where runs may be written: MRSFM_RUN_ROOT (set by the lab's SuperLink service), else the
    ServerApp's working directory. Whoever submits a run chooses its run-dir, so it is confined."""
    return Path(os.environ.get("MRSFM_RUN_ROOT") or os.getcwd()).expanduser().resolve()


def say(msg: str) -> None:
    log(INFO, "[mrsfm] %s", msg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, RunSettings.from_run_config(context.run_config))
    except (SitesMissingError, ValueError, RuntimeError) as exc:
        log(ERROR, "[mrsfm] federated run failed: %s", exc)
        raise


def run_federation(grid: Grid, s: RunSettings) -> dict:
    """Rounds `last completed + 1 .. num-rounds` of federated MAE pretraining over `grid`."""
    cfg = load_config([f"+fl={s.strategy}", *shlex.split(s.overrides)])
    # refused before anything is written: a threshold that cannot protect the run's rounds
    secure = check_run(cfg.fl, s.strategy, s.min_sites, len(s.expected_sites()))
    rd = RunDir(s.run_dir)
    rd.rounds.mkdir(parents=True, exist_ok=True)
    (rd.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    torch.manual_seed(cfg.seed)
    model = build_mae(cfg.model, cfg.data)
    done = rd.last_round()
    if done:
        try:
            load_weights(model, rd.checkpoint(done))
        except RuntimeError as exc:
            raise RuntimeError(f"{rd.checkpoint(done)} is not a checkpoint of this model "
                               f"({str(exc).splitlines()[0]}); use a new run-dir") from None
        rd.trim_metrics(done)
        say(f"resuming after round {done} from {rd.checkpoint(done)}")
    elif cfg.get("init"):
        say(f"round 1 starts from {init_mae(model, cfg.init)}")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{s.strategy}, rounds {done + 1}..{s.num_rounds} x {s.local_steps} local steps, {n_params / 1e6:.2f}M "
        f"parameters, {s.wire_dtype} on the wire, at least {s.min_sites} site(s), run dir {rd.path}")
    if secure is not None:
        shares, threshold = secure.resolve(max(s.min_sites, len(s.expected_sites())))
        say(f"secure aggregation (SecAgg+): the coordinator sees only the sum of the sites' updates; "
            f"{shares} shares per site, {threshold} rebuild a secret, updates clipped at the sites to norm "
            f"{secure.update_norm_bound:g}, encoded in steps of {secure.step:.2g}")
    if done < s.num_rounds:
        _rounds(grid, s, cfg, model, rd, done, secure)
    return _finish(s, cfg, model, rd)


def _rounds(grid: Grid, s: RunSettings, cfg, model, rd: RunDir, done: int, secure: SecAggSettings | None = None
            ) -> None:
    wgrid = WireGrid(grid, model.state_dict(), s.wire_dtype, s.min_sites, s.wait_timeout_s,
                     s.expected_sites(), rd.load_sites(), logger=say, validation=cfg.validation,
                     examples_per_update=s.local_steps * int(cfg.data.batch_size))
    strategy = make_strategy(s.strategy, cfg.fl, s.min_sites)
    strategy.round_offset = done
    strategy.load_state(rd.server_state(done))
    train_config = ConfigRecord({
        "overrides": s.overrides, "strategy": s.strategy, "local-steps": s.local_steps,
        "total-steps": s.num_rounds * s.local_steps,
        "wire-dtype": s.wire_dtype, "local-sleep-s": s.local_sleep_s, "run-key": rd.key()})
    clock = [time.monotonic()]
    scalars = Scalars(rd.path, bool(cfg.train.tensorboard), resume_step=done + 1)

    def on_round_end(local_round: int, arrays, outcome: SecureOutcome | None = None) -> MetricRecord | None:
        """Flower calls this after every round: checkpoint + metrics line (round 0: the start).
        Secure aggregation: `outcome` is all the round may record (server/secure.py)."""
        if local_round == 0:
            clock[0] = time.monotonic()
            return None
        rnd = done + local_round
        if outcome is not None:
            if not outcome.ok:  # logged by the round; nothing to commit, the next round goes on
                clock[0] = time.monotonic()
                return None
            record = _secure_record(rnd, s, outcome, round(time.monotonic() - clock[0], 3))
            clock[0] = time.monotonic()
            return commit(rnd, record, arrays, ", ".join(
                f"{x['site']} ({x['bytes_up'] / 1e6:.2f} MB up"
                + (f", epsilon {x['epsilon']:.2f}" if "epsilon" in x else "") + ")" for x in record["sites"])
                + "; securely aggregated, no per-site loss")
        replies = wgrid.last_train
        ok = [r for r in replies if r.ok]
        if not ok:
            raise RuntimeError(f"round {rnd}: no site update to aggregate ("
                               + "; ".join(f"{r.site}: {r.error}" for r in replies) + ")")
        weights = [float(r.metrics["num-examples"]) for r in ok]
        loss = sum(float(r.metrics["loss"]) * w for r, w in zip(ok, weights)) / sum(weights)
        now = time.monotonic()
        record = {
            "round": rnd, "step": rnd * s.local_steps, "loss": loss, "num_sites": len(ok),
            "sites": [{"site": r.site, "node_id": r.node_id, "loss": float(r.metrics["loss"]),
                       "num_examples": int(r.metrics["num-examples"]),
                       **({"reported_examples": _claim(r.metrics["reported-examples"])}
                          if "reported-examples" in r.metrics else {}),
                       "local_seconds": round(float(r.metrics.get("local-seconds", 0.0)), 3),
                       "setup_seconds": round(float(r.metrics.get("setup-seconds", 0.0)), 3),
                       # 0 when the site worker reused its model, data and optimizer from the round before
                       "build_seconds": round(float(r.metrics.get("build-seconds", 0.0)), 3),
                       "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, **_privacy(r.metrics),
                       **({"simulation_only": bool(r.metrics["simulation-only"])}  # no in vivo spectra at that site
                          if "simulation-only" in r.metrics else {})} for r in ok],
            "dropped": [{"site": r.site, "node_id": r.node_id, "error": r.error} for r in replies if not r.ok],
            "round_seconds": round(now - clock[0], 3), "server_seconds": dict(wgrid.last_seconds),
            "wire_dtype": s.wire_dtype, "strategy": s.strategy,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        clock[0] = now
        per_site = ", ".join(f"{r.site} {float(r.metrics['loss']):.4f} ({r.bytes_up / 1e6:.2f} MB up"
                             + (f", epsilon {float(r.metrics['epsilon']):.2f}" if "epsilon" in r.metrics else "")
                             + (", privacy budget spent" if r.metrics.get("budget-spent") else "")
                             + (", simulation only" if r.metrics.get("simulation-only") else "") + ")" for r in ok)
        return commit(rnd, record, arrays, per_site)

    def commit(rnd: int, record: dict, arrays, per_site: str) -> MetricRecord:
        """Server state, metrics line, then the checkpoint (the commit point) and the round's log line."""
        loss = record["loss"]
        model.load_state_dict(to_state(arrays))
        strategy.save_state(rd.server_state(rnd))
        rd.append_metrics(record)
        save_weights(model, rd.checkpoint(rnd), {"round": rnd, "strategy": s.strategy})  # commit point
        scalars.add({"loss": loss, "num_sites": record["num_sites"], "round_seconds": record["round_seconds"],
                     **{f"server_{k}_seconds": v for k, v in record["server_seconds"].items()}}, rnd, "round")
        for site in record["sites"]:
            scalars.add({k: site[k] for k in ("loss", "epsilon", "bytes_up", "bytes_down", "local_seconds")
                         if k in site}, rnd, f"site/{site['site']}")
        rd.save_sites(wgrid.sites)
        say(f"round {rnd}/{s.num_rounds} done in {record['round_seconds']:.1f} s: loss {loss:.4f} [{per_site}]"
            + (f"; dropped: {', '.join(d['site'] for d in record['dropped'])}" if record["dropped"] else "")
            + f" -> {rd.checkpoint(rnd)}")
        return MetricRecord({"loss": loss})

    try:
        if secure is not None:
            run_secure_rounds(wgrid, strategy, secure, s.strategy, as_fp32_record(model.state_dict()),
                              s.num_rounds - done, s.round_timeout_s, train_config,
                              s.local_steps * int(cfg.data.batch_size), on_round_end)
        else:
            strategy.start(wgrid, as_fp32_record(model.state_dict()), num_rounds=s.num_rounds - done,
                           timeout=s.round_timeout_s, train_config=train_config, evaluate_fn=on_round_end)
    finally:
        scalars.close()


def _finish(s: RunSettings, cfg, model, rd: RunDir) -> dict:
    """Encoder export, training curve and a reconstruction figure, as `mrsfm pretrain` leaves them."""

    rows = rd.read_metrics()
    if rows:
        plot_curve(rd.metrics, rd.path / "training_curve.png")
    stream = build_stream(cfg.data, seed=cfg.seed, device="cpu")
    plot_reconstructions(model, {"simulated": stream.sim_batch(10**6, k=len(stream.simulators) or 1).x[0]},
                         rd.path / "reconstruction.png", seed=cfg.seed)
    card = pretraining_card(cfg, rows[-1]["loss"] if rows else None, trained_rounds=rd.last_round(),
                            local_steps=s.local_steps, privacy=privacy_summary(rows),
                            federated={"strategy": s.strategy, "wire_dtype": s.wire_dtype,
                                       "sites": sorted({x["site"] for r in rows for x in r["sites"]})})
    export_encoder(model, rd.path / "encoder.safetensors", card)
    for site, p in card["privacy"].items():
        say(f"privacy of {site}: " + (f"epsilon {p['epsilon']:.3f} at delta {p['delta']:g} after {p['private_steps']} "
                                      f"private step(s) over {p['rounds']} round(s)"
                                      + (", budget spent" if p["budget_spent"] else "")
                                      + (f"; but {p['unprotected_rounds']} round(s) trained on the same spectra "
                                         "without DP: no epsilon bounds those" if p["unprotected_rounds"] else "")
                                      if p else
                                      "no differential privacy (plain SGD on its private data, if any)"))
    say(f"encoder -> {rd.path / 'encoder.safetensors'}")
    return card


def _secure_record(rnd: int, s: RunSettings, out: SecureOutcome, seconds: float) -> dict:
    """A securely aggregated round's metrics line: the aggregate loss, which sites took part with
    their counts, timings and DP accounting (never a site's loss or weights), and who dropped."""
    return {
        "round": rnd, "step": rnd * s.local_steps, "loss": out.loss, "num_sites": len(out.sites),
        "sites": [{"site": x["site"], "node_id": x["node_id"], "num_examples": x["num_examples"],
                   "local_seconds": round(float(x["metrics"].get("local-seconds", 0.0)), 3),
                   "setup_seconds": round(float(x["metrics"].get("setup-seconds", 0.0)), 3),
                   "build_seconds": round(float(x["metrics"].get("build-seconds", 0.0)), 3),
                   "bytes_up": x["bytes_up"], "bytes_down": x["bytes_down"], **_privacy(x["metrics"]),
                   **({"simulation_only": bool(x["metrics"]["simulation-only"])}
                      if "simulation-only" in x["metrics"] else {})} for x in out.sites],
        "dropped": out.dropped, "round_seconds": seconds, "server_seconds": {"secagg": round(out.seconds, 3)},
        "secure_aggregation": {"shares": out.shares, "threshold": out.threshold,
                               "aggregate_norm": round(float(out.aggregate_norm or 0.0), 6)},
        "wire_dtype": "secagg", "strategy": s.strategy, "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _claim(value) -> float | str:
    """A site's own num-examples as the metrics line can hold it (JSON has no NaN; absent: 'none')."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else str(value).lower()


def _privacy(metrics: dict) -> dict:
    """A site's privacy figures for its metrics line, from its own ledger: epsilon and friends when
    it trains with DP, and how many rounds ever trained on its private spectra without DP."""
    out = {"unprotected_rounds": int(metrics["unprotected-rounds"])} if "unprotected-rounds" in metrics else {}
    if "epsilon" not in metrics:
        return out
    return {**out, "epsilon": float(metrics["epsilon"]), "delta": float(metrics["delta"]),
            "private_steps": int(metrics["private-steps"]), "budget_spent": bool(metrics["budget-spent"])}


def privacy_summary(rows: list[dict]) -> dict[str, dict | None]:
    """Per site: its latest (cumulative) epsilon, delta, private steps summed over rounds, budget
    state; None for a site that never reported DP figures. From metrics.jsonl rows."""
    out: dict[str, dict | None] = {}
    for row in rows:
        for x in row["sites"]:
            prev = out.get(x["site"])
            if "epsilon" not in x:
                out.setdefault(x["site"], None)
                continue
            steps = (prev["private_steps"] if prev else 0) + x["private_steps"]
            out[x["site"]] = {"epsilon": x["epsilon"], "delta": x["delta"], "private_steps": steps,
                              "budget_spent": x["budget_spent"], "rounds": (prev["rounds"] if prev else 0) + 1,
                              "unprotected_rounds": x.get("unprotected_rounds", 0)}
    return out
