"""ClientApp: one site's local MAE training with the shared Trainer, on its private spectra.

Node config (set by `python -m client --site X`): `site`, `data-dir` (private in vivo folder;
empty or absent: simulated data only), `state-dir` (optimizer state between rounds: every
message runs in a fresh process), `device` (auto: CUDA when present), `overrides` (the site's
Hydra overrides, e.g. its vendor mix of simulation profiles) and optionally `seed`.

Heavy imports live inside the handlers, so that a `query` (which site are you?) answers fast.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _node(context: Context, key: str, default: str = "") -> str:
    return str(context.node_config.get(key, default) or default)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Name this site (the server uses it to say which sites are missing)."""
    return Message(RecordDict({"site": ConfigRecord({"site": _node(context, "site", f"node-{context.node_id}")})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    import shlex

    from mrsfm_model.config import load_config, resolve_device
    from mrsfm_model.data import build_stream
    from mrsfm_model.mae import build_mae, mae_loss
    from mrsfm_model.train import OptimConfig, Trainer
    from server.wire import decode, encode, nbytes

    t0 = time.perf_counter()
    conf = msg.content["config"]
    site = _node(context, "site", f"node-{context.node_id}")
    overrides = [f"+fl={conf['strategy']}", *shlex.split(str(conf["overrides"])),  # the coordinator's
                 *shlex.split(_node(context, "overrides"))]  # then this site's (its vendor mix, ...)
    cfg = load_config(overrides)
    device = resolve_device(_node(context, "device", "auto"))
    rnd, local_steps = int(conf["server-round"]), int(conf["local-steps"])
    model = build_mae(cfg.model, cfg.data)
    model.load_state_dict(decode(msg.content["arrays"], model.state_dict()))
    model.to(device)

    if float(conf.get("local-sleep-s", 0.0)) > 0:  # benchmarks: transport cost without training
        setup = time.perf_counter() - t0
        time.sleep(float(conf["local-sleep-s"]))
        last, batch_size, seconds = {"loss": 0.0}, int(cfg.data.batch_size), float(conf["local-sleep-s"])
    else:
        # each site draws its own simulated spectra (same config, different seed)
        seed = int(context.node_config.get("seed", cfg.seed + zlib.crc32(site.encode()) % 2**31))
        data_dir = _node(context, "data-dir")
        stream = build_stream(cfg.data, seed=seed, device=device, invivo_dir=data_dir or None)
        n_invivo = 0 if stream.invivo is None else len(stream.invivo)
        for err in [] if stream.invivo is None else stream.invivo.errors:
            print(f"[mrsfm] {site}: skipped {err}", flush=True)
        mu = float(conf.get("proximal-mu", 0.0))
        loss_fn = _proximal(mae_loss, model, mu) if mu > 0 else mae_loss
        trainer = Trainer(model, loss_fn, OptimConfig.from_config(cfg.train), int(conf["total-steps"]),
                          stream.batch_size, device, progress=False)
        state = Path(_node(context, "state-dir", f"~/.mrsfm/state/{site}")).expanduser() / str(conf["run-key"])
        if (state / "trainer.pt").is_file():  # optimizer moments and RNG from this site's previous round
            global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trainer.load(state)
            model.load_state_dict(global_weights)
        trainer.step = (rnd - 1) * local_steps  # the LR schedule continues across rounds
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        last = trainer.fit(stream(trainer.step), local_steps, log_every=local_steps, desc=f"{site} round {rnd}")
        seconds = time.perf_counter() - t1
        trainer.save(state)
        batch_size = stream.batch_size
        loss = last.get("mae_loss", last["loss"])
        print(f"[mrsfm] {site} round {rnd}: {local_steps} steps in {seconds:.1f} s, loss {loss:.4f}, "
              f"{n_invivo} in vivo spectra from {data_dir or '(none: simulation only)'} on {device}", flush=True)

    arrays = encode(model.state_dict(), str(conf["wire-dtype"]))
    metrics = MetricRecord({"num-examples": local_steps * batch_size, "loss": float(last.get("mae_loss", last["loss"])),
                            "local-seconds": float(seconds), "setup-seconds": float(setup),
                            "bytes-sent": nbytes(arrays)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "site": ConfigRecord({"site": site})}),
                   reply_to=msg)


def _proximal(loss_fn, model, mu: float):
    """FedProx: the MAE loss plus (mu/2)·||w - w_global||², w_global fixed at the round's start."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def wrapped(m, batch):
        loss, metrics = loss_fn(m, batch)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        return loss + 0.5 * mu * prox, {**metrics, "mae_loss": loss.detach()}

    return wrapped
