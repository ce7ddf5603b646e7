"""ClientApp: one site's local MAE training with the shared Trainer, on its private spectra.

Node config (set by `python -m client --site X`): `site`, `data-dir` (private in vivo folder;
empty or absent: simulated data only), `state-dir` (optimizer state between rounds: every
message runs in a fresh process), `device` (auto: CUDA when present), `overrides` (the site's
Hydra overrides, e.g. its vendor mix of simulation profiles) and optionally `seed`.

Heavy imports live inside the handlers, so that a `query` (which site are you?) answers fast.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure import is_secure_round, secure_mod, secure_reply
from mrsfm_model import logs
from mrsfm_model.training.ledger import PrivacyLedger, data_fingerprint

app = ClientApp()
RUN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what RunDir.key() makes; anything else could climb out of state-dir
_log = logs.get_logger("client")


def _node(context: Context, key: str, default: str = "") -> str:
    return str(context.node_config.get(key, default) or default)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Name this site (the server uses it to say which sites are missing)."""
    return Message(RecordDict({"site": ConfigRecord({"site": _node(context, "site", f"node-{context.node_id}")})}),
                   reply_to=msg)


@app.train(mods=[secure_mod])
def train(msg: Message, context: Context) -> Message:
    """A plain round (weights in, weights out), or the training stage of Flower's SecAgg+ protocol
    (fl.secure_aggregation=true: client/secure.py checks and clips the update before it is masked)."""
    from mrsfm_model.model.wire import nbytes, pack_state, unpack_state

    node = {k: str(v) for k, v in context.node_config.items()}
    node.setdefault("site", f"node-{context.node_id}")
    if is_secure_round(msg.content):
        return secure_reply(msg, context, node, local_round, _log.warning)
    conf = dict(msg.content["config"])
    state, metrics = local_round(conf, node, lambda template: unpack_state(msg.content["arrays"], template))
    arrays = pack_state(state, str(conf["wire-dtype"]))
    metrics["bytes-sent"] = nbytes(arrays)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                               "site": ConfigRecord({"site": node["site"]})}), reply_to=msg)


@dataclass
class SiteSession:
    """What a site builds once per run and reuses every round: the composed config, the data stream
    (private folder on the canonical grid), the model and the Trainer with its optimizer. An
    ephemeral ClientApp process builds it for one message and drops it; the site worker
    (client/worker.py) keeps it between rounds. Either way a round's result is the same (a round
    done again, after a server restart, gets a fresh session, as a fresh process would)."""

    key: tuple
    site: str
    cfg: object
    device: object
    stream: object
    trainer: object
    dp: object
    ledger: PrivacyLedger | None
    state: Path
    data_dir: str
    n_invivo: int
    done_round: int = 0  # the round whose optimizer state and RNG this object holds in memory
    rng: object = None


_SESSION: SiteSession | None = None  # the warm one (a site worker keeps it between messages)


def site_session(conf: Mapping, node: Mapping[str, str]) -> tuple[SiteSession, float]:
    """This run's session, reused when the worker already holds it and has not yet done this round;
    (session, seconds spent building)."""
    global _SESSION
    import shlex

    import torch

    from mrsfm_model.config import load_config, resolve_device, site_owned_keys
    from mrsfm_model.data.stream import build_stream
    from mrsfm_model.model.mae import build_mae, mae_loss
    from mrsfm_model.training.privacy import DPConfig
    from mrsfm_model.training.trainer import OptimConfig, Trainer

    site = node["site"]
    if not RUN_KEY.fullmatch(str(conf.get("run-key", ""))):  # it names a folder under this site's state-dir
        raise ValueError(f"site {site}: refused the server's run-key {str(conf.get('run-key'))[:80]!r} "
                         "(a plain name of letters, digits, - and _ is expected)")
    theirs = shlex.split(str(conf["overrides"]))
    if owned := site_owned_keys(theirs):
        msg = (f"[mrsfm] {site}: refused the coordinator's override of {', '.join(owned)} (privacy settings and "
               "data paths are the site's own: set them in its site config)")
        _log.error(msg)
        raise ValueError(msg)
    rnd = int(conf["server-round"])
    key = (str(conf["strategy"]), tuple(theirs), str(conf["run-key"]), int(conf["total-steps"]),
           tuple(sorted(node.items())))
    if _SESSION is not None and _SESSION.key == key and rnd > _SESSION.done_round:
        return _SESSION, 0.0  # (a round redone after a server restart starts from scratch, as a fresh process)
    _SESSION = None  # another run: free the old model before building the new one
    t0 = time.perf_counter()
    overrides = [f"+fl={conf['strategy']}", *theirs,  # the coordinator's
                 *shlex.split(node.get("overrides", ""))]  # then this site's (its vendor mix, privacy, ...)
    cfg = load_config(overrides)
    device = resolve_device(node.get("device") or "auto")
    # each site draws its own simulated spectra (same config, different seed)
    seed = int(node.get("seed") or cfg.seed + zlib.crc32(site.encode()) % 2**31)
    torch.manual_seed(seed)  # the model's initial draw and round 1's masks: the same in any process
    model = build_mae(cfg.model, cfg.data)
    data_dir = node.get("data-dir", "")
    stream = build_stream(cfg.data, seed=seed, device=device, invivo_dir=data_dir or None)
    n_invivo = 0 if stream.invivo is None else len(stream.invivo)
    for err in [] if stream.invivo is None else stream.invivo.errors:
        _log.warning(f"[mrsfm] {site}: skipped {err}")
    trainer = Trainer(model, mae_loss, OptimConfig.from_config(cfg.train), int(conf["total-steps"]),
                      stream.batch_size, device, progress=False)
    state_root = Path(node.get("state-dir") or f"~/.mrsfm/state/{site}").expanduser()
    # what training on these private spectra has spent, across runs (None: no private data in use)
    ledger = (PrivacyLedger(state_root, data_fingerprint(data_dir))
              if n_invivo and float(cfg.data.invivo_fraction) > 0 else None)
    _SESSION = SiteSession(key, site, cfg, device, stream, trainer, DPConfig.from_config(cfg.privacy), ledger,
                           state_root / str(conf["run-key"]), data_dir, n_invivo, rng=torch.get_rng_state())
    return _SESSION, time.perf_counter() - t0


def local_round(conf: Mapping, node: Mapping[str, str],
                global_weights: Callable[[dict], dict]) -> tuple[dict, dict[str, float]]:
    """One site's round: `conf` is the server's train config, `node` the site's node config,
    `global_weights(template_state)` the round's global weights as a float32 state dict.
    Returns the locally trained state dict and the metrics the server logs."""
    import torch

    from mrsfm_model.model.mae import mae_loss

    t0 = time.perf_counter()
    logs.setup(node.get("log-level") or "INFO")  # the site's own level (site.log_level)
    s, built = site_session(conf, node)
    trainer, model, site = s.trainer, s.trainer.model, s.site
    rnd, local_steps = int(conf["server-round"]), int(conf["local-steps"])
    if s.done_round == rnd - 1 and s.rng is not None:  # this object holds the previous round's end state
        torch.set_rng_state(s.rng)
    elif (s.state / "trainer.pt").is_file():  # optimizer moments and RNG from this site's previous round, on disk
        trainer.load(s.state)
    s.rng = None
    model.load_state_dict(global_weights(model.state_dict()))
    model.to(s.device)
    if float(conf.get("local-sleep-s", 0.0)) > 0:  # benchmarks: transport cost without training
        setup = time.perf_counter() - t0
        _log.info(f"[mrsfm] {site} round {rnd}: local sleep {float(conf['local-sleep-s']):g} s instead of training")
        time.sleep(float(conf["local-sleep-s"]))
        return model.state_dict(), {"num-examples": local_steps * int(s.cfg.data.batch_size), "loss": 0.0,
                                    "local-seconds": float(conf["local-sleep-s"]), "setup-seconds": setup,
                                    "build-seconds": built}
    mu = float(conf.get("proximal-mu", 0.0))
    trainer.loss_fn = _proximal(mae_loss, model, mu) if mu > 0 and not s.dp.enabled else mae_loss
    trainer.step = (rnd - 1) * local_steps  # the LR schedule continues across rounds
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_key = str(conf["run-key"])
    if s.dp.enabled:
        metrics = _private_round(trainer, s.stream, s.dp, s.ledger, run_key, site, local_steps,
                                 int(conf["total-steps"]))
        loss = metrics.pop("loss")
    else:
        last = trainer.fit(s.stream(trainer.step, local_steps), local_steps, log_every=local_steps, desc=f"{site} round {rnd}")
        loss, metrics = float(last.get("mae_loss", last["loss"])), {}
        if s.ledger is not None:
            s.ledger.record_unprotected(run_key)
    if s.ledger is not None:
        metrics["unprotected-rounds"] = float(s.ledger.unprotected_rounds)
    seconds = time.perf_counter() - t1
    trainer.save(s.state)
    s.done_round, s.rng = rnd, torch.get_rng_state()
    dp_note = (f", epsilon {metrics['epsilon']:.2f} after {metrics['private-steps']:.0f} private step(s) this round"
               if s.dp.enabled else "")
    _log.info(f"[mrsfm] {site} round {rnd}: {local_steps} steps in {seconds:.1f} s, loss {loss:.4f}, "
              f"{s.n_invivo} in vivo spectra from {s.data_dir or '(none: simulation only)'} on {s.device}{dp_note}")
    return model.state_dict(), {"num-examples": local_steps * s.stream.batch_size, "loss": loss,
                                "local-seconds": seconds, "setup-seconds": setup, "build-seconds": built,
                                "simulation-only": float(not s.n_invivo), **metrics}


def _private_round(trainer, stream, dp, ledger, run_key: str, site: str, local_steps: int,
                   total_steps: int) -> dict[str, float]:
    """DP-SGD on the private in vivo spectra, non-private steps on the shared simulated ones.

    The private share of the steps is `data.invivo_fraction`; the accountant continues the site's
    ledger for these spectra (mrsfm_model/training/ledger.py), so epsilon is cumulative over every
    round of every run that trained on them."""
    import torch

    from mrsfm_model.model.mae import mae_loss
    from mrsfm_model.training.privacy import PrivateSite

    if not stream.simulators:
        raise ValueError(f"site {site}: a DP site reports its loss on shared simulated data only (a loss on the "
                         "private spectra would leak beside DP); keep data.sim_profiles non-empty")
    if stream.invivo is None or ledger is None:
        raise ValueError(f"site {site}: privacy.enabled=true needs private in vivo spectra (site.data_dir); "
                         "simulated data needs no privacy")
    frac = stream.n_invivo / stream.batch_size  # (simulators present: checked above)
    private = max(1, round(local_steps * frac)) if frac > 0 else 0
    if dp.target_epsilon is not None and dp.planned_steps <= 0:  # plan over the whole run
        dp.planned_steps = max(1, round(total_steps * frac))
    dp_site = PrivateSite(trainer, stream.invivo.x.to(trainer.device), dp, state={"history": ledger.history})
    spent_before = not dp_site.budget_left()
    public = (stream.sim_batch(trainer.step + i, k=stream.batch_size) for i in range(10**9))
    try:
        out = dp_site.run_round(public, local_steps, private)
    finally:  # the Opacus hooks come off even when the round fails (a warm model is used again)
        dp_site.close()
    if out["loss"] is None:  # every step was private: measure on a public batch, without training
        with torch.no_grad():
            trainer.model.eval()
            out["loss"] = float(mae_loss(trainer.model, next(public))[0])
    ledger.record_private(dp_site.state()["history"], run_key)
    if out["budget_spent"]:
        _log.warning(f"[mrsfm] {site}: privacy budget spent (epsilon {out['epsilon']:.3f} of {dp.epsilon_budget}); "
                     + ("no private steps this round" if spent_before else "private steps stop here")
                     + ", training continues on shared simulated data only")
    return {"loss": out["loss"], "epsilon": out["epsilon"], "delta": out["delta"],
            "private-steps": out["private_steps"], "noise-multiplier": out["noise_multiplier"],
            "budget-spent": float(out["budget_spent"])}


def _proximal(loss_fn, model, mu: float):
    """FedProx: the MAE loss plus (mu/2)·||w - w_global||², w_global fixed at the round's start."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def wrapped(m, batch):
        loss, metrics = loss_fn(m, batch)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        return loss + 0.5 * mu * prox, {**metrics, "mae_loss": loss.detach()}

    return wrapped
