"""Few-label fine-tuning of the exported encoder, beside the same encoder at initialisation and
timm's from-scratch ViT.

Three modes:
- linear: the encoder is frozen; its pooled features (`global_pool`; `flat` keeps each ppm band
  in its place) are computed once and the regularised logistic / ridge regression of the
  non-deep baselines (mrsfm_model.evaluation.linear) is fitted on them, kept as BatchNorm + Linear;
- latent: the same regression on the outputs of the encoder's latent head (its own estimates of
  metabolite ratios and acquisition parameters, model/quantifier.py): a few numbers per spectrum
  that carry what pretraining learnt about the chemistry;
- full: the whole ViT is trained by the shared `Trainer`, with layer-wise learning-rate decay,
  its head either fresh or the linear probe's (`head_init: probe`, LP-FT).
Classification uses cross-entropy and reports accuracy, balanced accuracy and macro-F1;
regression standardises targets on the training set and reports MAE and R² per target.
The networks and read-out heads themselves are built in evaluation/networks.py (shared with a
study and with prediction); the metrics and statistics are in evaluation/stats.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mrsfm_model.config import ConfigSection
from mrsfm_model.data.spectrum import VENDORS
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.linear import Penalty, fit_predict
from mrsfm_model.evaluation.networks import (
    FROZEN_READOUTS,
    RANDOM_INIT,
    architecture,
    arm_start,
    fit_probe,
    fit_readout,
    fold_probe_into_head,
    frozen_network,
    network_outputs,
    start_network,
)
from mrsfm_model.evaluation.stats import classification_metrics, mean_ci95, regression_metrics
from mrsfm_model.evaluation.tasks import (
    HEAD_ESTIMATES,
    QUANT_TARGETS,
    benchmark_from_config,
    generators_seen,
    lcm_ratios,
)
from mrsfm_model.logs import Log, get_logger
from mrsfm_model.model.mae import MAEConfig
from mrsfm_model.model.quantifier import calibrate, has_quantifier, load_quantifier
from mrsfm_model.reports.cards import read_card
from mrsfm_model.training.trainer import OptimConfig, Trainer

_log = get_logger("evaluation")


@dataclass
class FinetuneConfig(ConfigSection):
    """One fine-tuning run's settings; values (and their reasons) in configs/finetune/default.yaml."""

    SECTION = "finetune"
    mode: str  # full | linear | latent
    steps: int
    batch_size: int
    blr: float
    layer_decay: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    global_pool: str  # flat (tokens in ppm order) | avg (mean of patch tokens, MAE's fine-tuning) | token ([CLS])
    head_init: str  # random | probe: full fine-tune starts from the linear probe's head (LP-FT)
    l2: tuple[float, ...]  # L2 penalty grid of every linear read-out, chosen by inner CV (evaluation/linear.py)

    def check(self) -> None:
        if self.mode not in FROZEN_READOUTS + ("full",):
            raise ValueError(f"config finetune.mode: expected full|linear|latent, got {self.mode!r}")
        if self.head_init not in ("random", "probe"):
            raise ValueError(f"config finetune.head_init: expected random|probe, got {self.head_init!r}")
        if self.global_pool not in ("avg", "token", "flat"):
            raise ValueError(f"config finetune.global_pool: expected avg|token|flat, got {self.global_pool!r}")


@dataclass
class FinetuneGrid(ConfigSection):
    """The cells a benchmark or a panel runs (finetune.tasks x modes x label_sizes x seeds) and the
    quantification task's steps; values in configs/finetune/default.yaml. Read typed, so that an
    override like `finetune.seeds=[a]` fails naming its key instead of inside a sampler."""

    SECTION = "finetune"
    tasks: tuple[str, ...]  # vendor | quant
    modes: tuple[str, ...]  # the benchmark's deep modes (a panel is given its own)
    label_sizes: tuple[int, ...]
    seeds: tuple[int, ...]  # paired: seed s draws the same labelled sample for every arm
    quant_steps: int  # full fine-tuning steps of the quant task (finetune.steps: the vendor task's)
    lcm: bool  # quant task: also the linear-combination fit baseline


class LabelledBatches:
    """Endless seeded minibatches from a small labelled set (with replacement across epochs)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        self.x, self.y, self.bs, self.device = x, y, min(batch_size, len(x)), device
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            for idx in torch.randperm(len(self.x), generator=self.gen).split(self.bs):
                if len(idx) == self.bs:
                    yield self.x[idx].to(self.device), self.y[idx].to(self.device)


def _loss_fn(task: str):
    def loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch
        out = model(x)
        if task == "classification":
            return nn.functional.cross_entropy(out.float(), y), {}
        return nn.functional.mse_loss(out.float(), y), {}

    return loss


def train_model(
    x: torch.Tensor, y: torch.Tensor, task: str, n_out: int, encoder: str | Path | None, mae_cfg: MAEConfig,
    cfg: FinetuneConfig, seed: int, device: torch.device,
) -> nn.Module:
    """Train on (x, y) and return a module mapping images to outputs (logits or standardised values)."""
    torch.manual_seed(seed)
    if cfg.mode in FROZEN_READOUTS:
        return fit_readout(frozen_network(encoder, mae_cfg, cfg.mode, cfg.global_pool, n_out), x, y, task, n_out,
                           cfg.l2, device)
    vit = start_network(encoder, mae_cfg, n_out, cfg.global_pool)
    if cfg.head_init == "probe":  # LP-FT: start the full fine-tune from the linear probe's head
        fold_probe_into_head(vit, fit_probe(vit, x, y, task, n_out, cfg.l2, device))
    opt = OptimConfig.from_config(blr=cfg.blr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                  layer_decay=cfg.layer_decay if encoder else None, grad_clip=cfg.grad_clip)
    Trainer(vit, _loss_fn(task), opt, cfg.steps, cfg.batch_size, device, progress=False).fit(
        iter(LabelledBatches(x, y, cfg.batch_size, seed, device)), cfg.steps, log_every=cfg.steps)
    return vit.eval()


def fit_and_evaluate(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, task: str,
    encoder: str | Path | None, mae_cfg: MAEConfig, cfg: FinetuneConfig, seed: int, device: torch.device,
    target_names: Sequence[str] = (), n_classes: int = 0,
) -> dict[str, float]:
    """One seed of one arm: train on the labelled sample, score on the held-out test set."""
    if task == "classification":
        model = train_model(x_train, y_train.long(), task, n_classes, encoder, mae_cfg, cfg, seed, device)
        pred = network_outputs(model, x_test, device).argmax(1).numpy()
        return classification_metrics(y_test.numpy(), pred, n_classes)
    mu, sd = y_train.mean(0), y_train.std(0).clamp_min(1e-6)
    model = train_model(x_train, (y_train - mu) / sd, task, y_train.shape[1], encoder, mae_cfg, cfg, seed, device)
    pred = network_outputs(model, x_test, device) * sd + mu
    return regression_metrics(y_test.numpy(), pred.numpy(), target_names)


# -- the benchmark table -------------------------------------------------------------------------
HEADLINE = {"vendor": "accuracy", "quant": "r2_GABA/tCr"}


def run_benchmark(cfg, encoder: str | Path | None, out_dir: str | Path, device: torch.device,
                  log: Log = _log.info) -> dict:
    """Every arm, mode, label size and seed -> table, paired differences, JSON and PNG.

    Deep arms: `pretrained` (the encoder), `random_init` (the same MAE encoder at its initialisation,
    fine-tuned with the same recipe: what pretraining adds) and `scratch` (timm's initialisation of
    the same ViT). Non-deep arms: logistic / ridge regression on spectra and on the ViT's own pixels,
    and for quantification the linear-combination fit (no labels). Seeds are paired: seed s draws the
    same labelled sample for every arm, so differences are taken per seed."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ft = cfg.finetune
    grid = FinetuneGrid.from_config(ft)
    builder = InputBuilder.from_data_config(cfg.data)
    mae_cfg = architecture(cfg, Path(encoder) if encoder else None, builder)
    log(f"building the benchmark ({ft.benchmark.subjects_per_vendor} subjects per vendor, seed {ft.benchmark.seed})")
    bench = benchmark_from_config(cfg, device=device)
    test = bench.test
    transfer = None
    if encoder:
        pre = (read_card(encoder) or {}).get("data", {}).get("sim_profiles")
        if pre is not None:
            seen = generators_seen(pre)
            transfer = {"pretraining_profiles": pre, "benchmark_generators_seen": seen, "transfer": not seen}
            log("transfer split: pretraining never saw the benchmark's generators" if not seen else
                f"in-distribution: pretraining saw the benchmark's generators {seen}")
    inits = ["pretrained", "random_init"] if encoder else []
    arms = [(init, mode) for init in [*inits, "scratch"] for mode in grid.modes]
    # the yardsticks: logistic / ridge regression on the magnitude spectra, and on the very image the ViT sees
    arms += [("baseline", "spectrum"), ("baseline", "pixels")]
    head_est = None  # the pretrained model's own quantifier, when its encoder carries the latent head
    if "quant" in grid.tasks and (head_est := head_estimates(encoder, bench.x, device)) is not None:
        log("the encoder carries its latent head: also scored without labels (head) and calibrated on them (head_cal)")
    lcm = None
    if "quant" in grid.tasks and grid.lcm:
        log(f"linear-combination fit of the {int(test.sum())} test spectra (each with its vendor's basis set)")
        lcm = lcm_ratios(bench, test.nonzero()[:, 0], builder.grid)
    rows = []
    for task in grid.tasks:
        task_arms = arms + ([("baseline", "lcm_fit")] if task == "quant" and lcm is not None else [])
        if task == "quant" and head_est is not None:
            task_arms += [("pretrained", mode) for mode in HEAD_MODES]
        for init, mode in task_arms:
            steps = grid.quant_steps if task == "quant" else ft.steps
            fcfg = FinetuneConfig.from_config(ft, mode=mode, steps=steps) if mode in ("full", *FROZEN_READOUTS) else None
            for n in grid.label_sizes:
                per_seed = []
                for seed in grid.seeds:
                    idx = bench.labelled_sample(n, seed)
                    y = bench.vendor if task == "vendor" else bench.ratios
                    if mode == "lcm_fit":
                        per_seed.append(regression_metrics(y[test].numpy(), lcm.numpy(), QUANT_TARGETS))
                        continue
                    if mode in HEAD_MODES:
                        per_seed.append(head_metrics(head_est, y, idx if mode == "head_cal" else None, test))
                        continue
                    if init == "baseline":
                        feats = bench.spectra if mode == "spectrum" else bench.x.flatten(1)
                        per_seed.append(baseline_metrics(feats[idx], y[idx], feats[test], y[test], task,
                                                  len(VENDORS), ft.l2))
                        continue
                    per_seed.append(fit_and_evaluate(
                        bench.x[idx], y[idx], bench.x[test], y[test],
                        "classification" if task == "vendor" else "regression",
                        arm_start(init, encoder), mae_cfg, fcfg, seed, device, target_names=QUANT_TARGETS, n_classes=len(VENDORS)))
                summary = {k: mean_ci95([r[k] for r in per_seed]) for k in per_seed[0]}
                rows.append({"task": task, "init": init, "mode": mode, "n_labels": n, "metrics": summary,
                             "per_seed": per_seed})
                h = summary[HEADLINE[task]]
                log(f"  {task:<6} {init:<11} {mode:<8} n={n:<4} {HEADLINE[task]} {h['mean']:.3f} ± {h['ci95']:.3f}")
    paired = paired_differences(rows)
    result = {"encoder": str(encoder) if encoder else None, "test_spectra": int(test.sum()),
              "test_subjects": int(bench.subject[test].unique().numel()), "seeds": list(grid.seeds),
              "benchmark_seed": int(ft.benchmark.seed), "transfer": transfer, "rows": rows, "paired": paired}
    (out_dir / "finetune.json").write_text(json.dumps(result, indent=1))
    print_table(rows, log)
    print_paired(paired, log)
    plot_table(rows, out_dir / "finetune.png")
    return result


def paired_differences(rows: list[dict]) -> list[dict]:
    """Pretrained minus every other arm, per task, label size and seed (same labelled sample), with
    the mean and 95% interval of those differences: each deep mode against its own controls, and
    the full fine-tune against every non-deep arm."""
    out = []
    for r in rows:
        if r["init"] != "pretrained":
            continue
        key = HEADLINE[r["task"]]
        for other in rows:
            same = other["task"] == r["task"] and other["n_labels"] == r["n_labels"] and other is not r
            control = other["init"] in ("random_init", "scratch") and other["mode"] == r["mode"]
            yardstick = other["init"] == "baseline" and r["mode"] in ("full", *HEAD_MODES)
            if not (same and (control or yardstick)):
                continue
            d = [a[key] - b[key] for a, b in zip(r["per_seed"], other["per_seed"])]
            out.append({"task": r["task"], "n_labels": r["n_labels"], "metric": key, "arm": f"pretrained {r['mode']}",
                        "minus": f"{other['init']} {other['mode']}", "per_seed": d, **mean_ci95(d)})
    return out


def print_paired(paired: list[dict], log: Log = _log.info) -> None:
    if not paired:
        return
    log("paired differences (same labelled sample per seed; mean and 95% interval over seeds):")
    for p in paired:
        sign = "+" if p["mean"] >= 0 else "-"
        log(f"  {p['task']:<6} n={p['n_labels']:<4} {p['arm']} - {p['minus']:<20} {p['metric']:<12} "
            f"{sign}{abs(p['mean']):.3f} ± {p['ci95']:.3f}")


HEAD_MODES = ("head", "head_cal")  # the latent head as it is (no labels), and calibrated on the labelled sample


def head_estimates(encoder: str | Path | None, x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """(N, len(QUANT_TARGETS)) estimates of the encoder's own quantifier for images x; None when
    the encoder (a path) carries no latent head."""
    if not encoder or encoder == RANDOM_INIT or not has_quantifier(encoder):
        return None
    est = load_quantifier(encoder).to(device).estimate(x)
    return torch.stack([est[HEAD_ESTIMATES[t]] for t in QUANT_TARGETS], 1)


def head_metrics(est: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor | None, test: torch.Tensor) -> dict:
    """The quantifier's estimates scored on the test set: as they are, or after a per-target line
    fitted on the labelled sample (`calibrate`)."""
    pred = est[test].numpy().copy()
    if labelled is not None:
        for j in range(pred.shape[1]):
            slope, intercept = calibrate(est[labelled, j].numpy(), y[labelled, j].numpy())
            pred[:, j] = slope * pred[:, j] + intercept
    return regression_metrics(y[test].numpy(), pred, QUANT_TARGETS)


def baseline_metrics(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor, task: str,
              n_classes: int, l2: Penalty) -> dict[str, float]:
    """The non-deep arm (mrsfm_model.evaluation.linear, as the linear probe) scored like the deep ones; the
    regression targets are fitted together (ridge treats each column on its own)."""

    a, b = f_train.numpy(), f_test.numpy()
    if task == "vendor":
        prob = fit_predict(a, y_train.numpy(), b, "classification", n_classes, l2)
        return classification_metrics(y_test.numpy(), prob.argmax(1), n_classes)
    return regression_metrics(y_test.numpy(), fit_predict(a, y_train.numpy(), b, "regression", 0, l2), QUANT_TARGETS)


def print_table(rows: list[dict], log: Log = _log.info) -> None:
    log(f"{'task':<7}{'init':<12}{'mode':<9}{'labels':>7}  {'metric':<14}{'mean':>7}  {'95% CI':>8}")
    for r in rows:
        key = HEADLINE[r["task"]]
        m = r["metrics"][key]
        log(f"{r['task']:<7}{r['init']:<12}{r['mode']:<9}{r['n_labels']:>7}  {key:<14}{m['mean']:>7.3f}  ±{m['ci95']:>7.3f}")


def plot_table(rows: list[dict], out: Path) -> Path:
    from mrsfm_model.reports.plots import plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = HEADLINE[task]
        for arm in sorted({(r["init"], r["mode"]) for r in rows if r["task"] == task}):
            sel = [r for r in rows if r["task"] == task and (r["init"], r["mode"]) == arm]
            ax.errorbar([r["n_labels"] for r in sel], [r["metrics"][key]["mean"] for r in sel],
                        yerr=[r["metrics"][key]["ci95"] for r in sel], marker="o", capsize=3, label=" ".join(arm))
        if task == "vendor":
            ax.axhline(1 / 3, color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("labelled spectra")
        ax.set_ylabel(key)
        ax.set_title(task)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
