"""Many encoders scored on the same few-label tasks with the same labelled samples (paired seeds).

`mrsfm finetune` answers "is this encoder better than its controls?"; a comparison of pretraining
set-ups (federated, centralized, single site, with DP, ...) needs every encoder measured on exactly
the same labelled samples and test subjects, so that differences between arms are paired per seed.
Tasks:
- `vendor`: GE / Philips / Siemens from the vendor benchmark (accuracy);
- `quant`: GABA/tCr and NAA/tCr regression on the same spectra (R²);
- `lovo_<vendor>`: the quantification task on one vendor's spectra alone, for encoders whose
  pretraining never saw that vendor (leave-one-vendor-out: what a new site with a new scanner gets).
Modes: `linear` (frozen probe), `full` (fine-tune), and for encoders that carry the latent head,
`head` (its own GABA/NAA estimates, no labels) and `head_cal` (a line per target fitted on the
labelled sample); the head modes score the quantification tasks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mrsfm_model.data.spectrum import VENDORS
from mrsfm_model.data.stream import InputBuilder
from mrsfm_model.evaluation.finetune import (
    HEAD_MODES,
    FinetuneConfig,
    FinetuneGrid,
    baseline_metrics,
    fit_and_evaluate,
    head_estimates,
    head_metrics,
)
from mrsfm_model.evaluation.networks import RANDOM_INIT, architecture
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.evaluation.tasks import QUANT_TARGETS, Benchmark, build_benchmark
from mrsfm_model.logs import Log, get_logger

_log = get_logger("evaluation")
METRICS = {"vendor": ("accuracy",), "quant": tuple(f"r2_{t}" for t in QUANT_TARGETS)}


def task_metrics(task: str) -> tuple[str, ...]:
    """The figures a task reports (lovo_* are quantification tasks)."""
    return METRICS["vendor" if task == "vendor" else "quant"]


def vendor_profile(vendor: str) -> str:
    """The benchmark's simulation profile of a vendor (its MEGA-PRESS TE 68 basis set)."""
    return f"megapress_{vendor.lower()}"


@dataclass
class Task:
    name: str
    bench: Benchmark

    @property
    def classification(self) -> bool:
        return self.name == "vendor"

    @property
    def y(self) -> torch.Tensor:
        return self.bench.vendor if self.classification else self.bench.ratios


class Panel:
    """The tasks, built once; `score` runs one encoder (a path, RANDOM_INIT or None for timm's
    scratch ViT) through every task, label size, seed and mode; `baselines` the non-deep arms."""

    def __init__(self, cfg, device: torch.device, tasks: Sequence[str] = ("vendor", "quant"),
                 lovo: Sequence[str] = (), subjects_per_vendor: int | None = None, lovo_subjects: int | None = None,
                 log: Log = _log.info):
        """`lovo_subjects`: subjects of each held-out vendor (default: subjects_per_vendor); more than
        twice the largest label size, so that every seed draws its own labelled sample."""
        ft = cfg.finetune
        self.cfg, self.device, self.ft = cfg, device, ft
        self.grid = FinetuneGrid.from_config(ft)
        self.builder = InputBuilder.from_data_config(cfg.data)
        n = int(subjects_per_vendor or ft.benchmark.subjects_per_vendor)

        def make(profiles: Sequence[str] | None, n: int = n) -> Benchmark:
            return build_benchmark(self.builder.grid, self.builder.transform, self.builder.channels, n,
                                   ft.benchmark.scans_per_subject, ft.benchmark.test_fraction, ft.benchmark.seed,
                                   device, **({"profiles": profiles} if profiles else {}))

        self.tasks: list[Task] = []
        if tasks:
            log(f"building the vendor benchmark ({n} subjects per vendor, seed {ft.benchmark.seed})")
            bench = make(None)
            self.tasks += [Task(t, bench) for t in tasks]
        for vendor in lovo:
            if vendor not in VENDORS:
                raise ValueError(f"leave-one-vendor-out: unknown vendor {vendor!r} (one of {', '.join(VENDORS)})")
            k = int(lovo_subjects or n)
            log(f"building the leave-one-vendor-out task of {vendor} ({k} subjects)")
            self.tasks.append(Task(f"lovo_{vendor}", make((vendor_profile(vendor),), k)))

    def _cells(self):
        for task in self.tasks:
            for n in self.grid.label_sizes:
                yield task, n, [task.bench.labelled_sample(n, s) for s in self.grid.seeds]

    def score(self, encoder: str | Path | None, modes: Sequence[str] = ("linear",),
              tasks: Sequence[str] | None = None) -> list[dict]:
        """Rows {task, mode, n_labels, metrics: {name: mean/ci95/n}, per_seed} of one encoder;
        `tasks` restricts to some task names (e.g. no lovo task for an encoder that saw that vendor)."""
        path = Path(encoder) if encoder not in (None, RANDOM_INIT) else None
        mae_cfg = architecture(self.cfg, path, self.builder)
        heads: dict[int, torch.Tensor | None] = {}  # the head's estimates per benchmark, computed once
        rows = []
        for task, n, samples in self._cells():
            if tasks is not None and task.name not in tasks:
                continue
            test = task.bench.test
            for mode in modes:
                if mode in HEAD_MODES:
                    if task.classification:
                        continue
                    key = id(task.bench)
                    if key not in heads:
                        heads[key] = head_estimates(path, task.bench.x, self.device)
                    if heads[key] is not None:
                        rows.append(_row(task.name, mode, n, [
                            head_metrics(heads[key], task.y, idx if mode == "head_cal" else None, test)
                            for idx in samples]))
                    continue
                steps = self.grid.quant_steps if not task.classification else self.ft.steps
                fcfg = FinetuneConfig.from_config(self.ft, mode=mode, steps=steps)
                per_seed = [fit_and_evaluate(
                    task.bench.x[idx], task.y[idx], task.bench.x[test], task.y[test],
                    "classification" if task.classification else "regression", encoder, mae_cfg, fcfg, seed,
                    self.device, target_names=QUANT_TARGETS, n_classes=len(VENDORS))
                    for seed, idx in zip(self.grid.seeds, samples)]
                rows.append(_row(task.name, mode, n, per_seed))
        return rows

    def baselines(self) -> dict[str, list[dict]]:
        """Logistic / ridge regression on the model's own pixels and on the magnitude spectra."""
        out: dict[str, list[dict]] = {"pixels": [], "spectrum": []}
        l2 = self.ft.l2
        for task, n, samples in self._cells():
            test, b = task.bench.test, task.bench
            for name, feats in (("pixels", b.x.flatten(1)), ("spectrum", b.spectra)):
                per_seed = [baseline_metrics(feats[idx], task.y[idx], feats[test], task.y[test],
                                             "vendor" if task.classification else "quant", len(VENDORS), l2)
                            for idx in samples]
                out[name].append(_row(task.name, "baseline", n, per_seed))
        return out


def _row(task: str, mode: str, n: int, per_seed: list[dict]) -> dict:
    keys = task_metrics(task)
    return {"task": task, "mode": mode, "n_labels": n,
            "metrics": {k: mean_ci95([r[k] for r in per_seed]) for k in keys},
            "per_seed": [{k: r[k] for k in keys} for r in per_seed]}
