"""`mrsfm compare`: does federation pay, and what does privacy cost?

Every arm pretrains the same MAE from the same initialisation through the project's own ServerApp
and ClientApp on a real local federation (a SuperLink and one SuperNode per site, as processes on
loopback, started by `python -m client --site X` as at a hospital). Flower's simulation runtime would
run the same apps, but it needs Ray and never exercises the site worker, the wire format or the
sites' own configs; a comparison meant to tell a hospital what it gets should run the code it runs.

Sites: one hospital per vendor (ge, philips, siemens), each with its vendor's simulated PRESS and
MEGA-PRESS profiles and its own private in vivo-like set (its vendor's PRESS spectra, simulated and
written as NIfTI-MRS files): non-IID by construction. Arms, all on the same number of training
samples (rounds x steps_per_round x batch; asserted from every run's metrics):
- centralized: one "pooled" site holding every site's data;
- federated_<strategy>: the three sites (FedAvg, FedProx, FedAdam);
- single_<vendor>: one site alone;
- dp_eps<E>: FedAvg with DP-SGD on every site's private set, epsilon E its target and budget;
- hetero_<strategy>: private sets of unequal size (compare.sizes) and one site with noisier data;
- lovo_<vendor>_federated / _centralized: pretrained without that vendor's site, for the
  leave-one-vendor-out task (the single sites of the other vendors are that task's single arms);
- random_init and scratch: the controls (no pretraining), beside the non-deep baselines.
Downstream: mrsfm_model.evaluation.panel, every encoder on the same labelled samples per seed.

Everything lands under OUT: arms/<arm>/ (that federation's run, logs, configs, arm.json), data/
(the sites' private sets), scores/<arm>.json, and compare.jsonl, compare.json, compare.md,
compare.png. Starting again with the same OUT reuses finished arms and scores; a mode added to
compare.modes is scored on its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from mrsfm_model.config import ConfigSection, config_dir, load_config, resolve_device
from mrsfm_model.data.simulate import write_simulated
from mrsfm_model.data.spectrum import VENDORS
from mrsfm_model.evaluation.finetune import HEAD_MODES
from mrsfm_model.evaluation.networks import RANDOM_INIT
from mrsfm_model.evaluation.panel import Panel, task_metrics
from mrsfm_model.evaluation.stats import mean_ci95
from mrsfm_model.logs import Log, get_logger

from .local import run_local_federation
from .strategy import STRATEGIES

_log = get_logger("server")
MAIN = "federated_fedavg"  # the federated arm every target is measured on
CONTROLS = ("random_init", "scratch")


@dataclass
class CompareConfig(ConfigSection):
    """`mrsfm compare` settings; values and reasons in configs/compare/default.yaml."""

    SECTION = "compare"
    model: str
    rounds: int
    steps_per_round: int
    batch_size: int
    private_spectra: int
    sizes: tuple[int, ...]
    noisy_snr: tuple[float, float]
    strategies: tuple[str, ...]
    robust_strategy: str
    epsilons: tuple[float, ...]
    lovo: tuple[str, ...]
    arms: tuple[str, ...] | None
    modes: tuple[str, ...]
    label_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    subjects_per_vendor: int
    lovo_subjects: int

    PRETRAINING = ("model", "rounds", "steps_per_round", "batch_size", "private_spectra", "sizes", "noisy_snr",
                   "robust_strategy", "epsilons")  # what an arm's encoder depends on (besides its name)
    DOWNSTREAM = ("modes", "label_sizes", "seeds", "subjects_per_vendor", "lovo", "lovo_subjects")

    def part(self, keys: Sequence[str]) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k in keys}

    def check(self) -> None:
        if self.rounds < 1 or self.batch_size < 1 or self.private_spectra < 1:
            raise ValueError("config compare: rounds, batch_size and private_spectra must be >= 1")
        if self.steps_per_round < 6 or self.steps_per_round % 6:
            raise ValueError(f"config compare.steps_per_round: a multiple of 6 (split evenly over 1, 2 or 3 sites), "
                             f"got {self.steps_per_round}")
        for s in (*self.strategies, self.robust_strategy):
            if s not in STRATEGIES:
                raise ValueError(f"config compare.strategies: unknown strategy {s!r} (one of {', '.join(STRATEGIES)})")
        if len(self.sizes) != len(VENDORS) or min(self.sizes) < 1:
            raise ValueError(f"config compare.sizes: {len(VENDORS)} positive numbers (GE, Philips, Siemens)")
        if bad := [v for v in self.lovo if v not in VENDORS]:
            raise ValueError(f"config compare.lovo: unknown vendor {bad[0]!r} (one of {', '.join(VENDORS)})")
        if bad := [m for m in self.modes if m not in ("linear", "full", *HEAD_MODES)]:
            raise ValueError(f"config compare.modes: expected linear|full|{'|'.join(HEAD_MODES)}, got {bad[0]!r}")
        if len(self.seeds) < 2:
            raise ValueError("config compare.seeds: at least 2 (intervals are over paired seeds)")


@dataclass(frozen=True)
class SiteSpec:
    """One hospital of an arm: the vendors whose data it holds and its private set size per vendor."""

    name: str
    vendors: tuple[str, ...]
    private: int
    noisy: bool = False

    def profiles(self) -> list[str]:
        tail = "_noisy" if self.noisy else ""
        return [f"{seq}_{v.lower()}{tail}" for v in self.vendors for seq in ("press", "megapress")]


@dataclass(frozen=True)
class Arm:
    name: str
    group: str  # centralized | federated | single | privacy | heterogeneity | lovo
    sites: tuple[SiteSpec, ...]
    strategy: str = "fedavg"
    epsilon: float | None = None
    held_out: str | None = None  # the vendor this arm's pretraining never sees (lovo arms)

    @property
    def vendors(self) -> list[str]:
        return sorted({v for s in self.sites for v in s.vendors})


def plan_arms(c: CompareConfig) -> list[Arm]:
    """Every arm of the comparison (or those `c.arms` names), in the order they run."""
    n = c.private_spectra

    def site(vendor: str, size: int = n, noisy: bool = False) -> SiteSpec:
        return SiteSpec(vendor.lower(), (vendor,), size, noisy)

    every = tuple(site(v) for v in VENDORS)
    arms = [Arm("centralized", "centralized", (SiteSpec("pooled", VENDORS, n),))]
    arms += [Arm(f"federated_{s}", "federated", every, s) for s in c.strategies]
    arms += [Arm(f"single_{v.lower()}", "single", (site(v),)) for v in VENDORS]
    arms += [Arm(f"dp_eps{e:g}", "privacy", every, "fedavg", epsilon=e) for e in c.epsilons]
    sizes = [max(1, round(n * r / max(c.sizes))) for r in c.sizes]
    uneven = tuple(site(v, k, noisy=v == VENDORS[-1]) for v, k in zip(VENDORS, sizes))
    arms += [Arm(f"hetero_{s}", "heterogeneity", uneven, s) for s in dict.fromkeys(("fedavg", c.robust_strategy))]
    for v in c.lovo:
        rest = tuple(x for x in VENDORS if x != v)
        arms += [Arm(f"lovo_{v.lower()}_federated", "lovo", tuple(site(x) for x in rest), held_out=v),
                 Arm(f"lovo_{v.lower()}_centralized", "lovo", (SiteSpec(f"pooled_no_{v.lower()}", rest, n),),
                     held_out=v)]
    if c.arms is None:
        return arms
    known = {a.name: a for a in arms}
    if bad := [a for a in c.arms if a not in known and a not in CONTROLS]:
        raise ValueError(f"compare.arms: unknown arm {bad[0]!r}; known: {', '.join([*known, *CONTROLS])}")
    return [known[a] for a in c.arms if a in known]


# -- the arms' sites: configs and private data ---------------------------------------------------------
@contextlib.contextmanager
def config_folder(folder: Path) -> Iterator[None]:
    """MRSFM_CONFIG_DIR=folder for this process and every process it starts (SuperLink, sites)."""
    before = os.environ.get("MRSFM_CONFIG_DIR")
    os.environ["MRSFM_CONFIG_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MRSFM_CONFIG_DIR", None)
        else:
            os.environ["MRSFM_CONFIG_DIR"] = before


def write_configs(arm: Arm, c: CompareConfig, folder: Path) -> Path:
    """A copy of configs/ with one site file per site of `arm` (from the unicamp template: simulated
    profiles of its vendors, DP settings of the arm) and the noisy profiles it needs."""
    shutil.copytree(config_dir(), folder, dirs_exist_ok=True)
    template = OmegaConf.load(folder / "site" / "unicamp.yaml")
    for s in arm.sites:
        for profile in (p for p in s.profiles() if p.endswith("_noisy")):
            base = profile.removesuffix("_noisy")
            (folder / "simulation" / f"{profile}.yaml").write_text(
                f"# {base} with a noisier scanner (compare.noisy_snr)\ndefaults:\n  - {base}\n  - _self_\n\n"
                f"snr: [{c.noisy_snr[0]}, {c.noisy_snr[1]}]\n")
        site = OmegaConf.merge(template, {"name": s.name, "vendor": "/".join(s.vendors),
                                          "state_dir": f"~/.mrsfm/state/{s.name}"})
        overrides = [f"data.sim_profiles=[{','.join(s.profiles())}]"]
        if arm.epsilon is not None:
            overrides += ["privacy.enabled=true", f"privacy.target_epsilon={arm.epsilon}",
                          f"privacy.epsilon_budget={arm.epsilon}"]
        site.overrides = overrides
        OmegaConf.save(site, folder / "site" / f"{s.name}.yaml")
    return folder


def private_set(root: Path, vendor: str, n: int, noisy: bool) -> Path:
    """A vendor site's private in vivo-like set: n spectra of its PRESS profile (noisy: the arm's
    noisier copy, so MRSFM_CONFIG_DIR must name that arm's configs), written once under root/data."""
    name = f"{vendor.lower()}_{n}{'_noisy' if noisy else ''}"
    folder = root / "data" / name
    if not folder.is_dir():
        tmp = root / "data" / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_simulated(f"press_{vendor.lower()}{'_noisy' if noisy else ''}", n, tmp, seed=1000 + VENDORS.index(vendor))
        tmp.rename(folder)
    return folder


def site_folder(site: SiteSpec, root: Path) -> Path:
    """A site's private folder: its vendor's set, or (pooled sites) links to the files of each vendor's."""
    parts = [private_set(root, v, site.private, site.noisy) for v in site.vendors]
    if len(parts) == 1:
        return parts[0]
    folder = root / "data" / site.name
    folder.mkdir(parents=True, exist_ok=True)
    for part in parts:
        for f in part.iterdir():
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
    return folder


# -- running the arms ----------------------------------------------------------------------------------
def run_arm(arm: Arm, c: CompareConfig, root: Path, log: Log = _log.info) -> dict:
    """Pretrain one arm on a local federation; its summary (also arm.json, which a rerun reuses)."""
    out = root / "arms" / arm.name
    done = out / "arm.json"
    if done.is_file():
        return _reuse(done, c.part(c.PRETRAINING))
    t0 = time.monotonic()
    local = c.steps_per_round // len(arm.sites)
    log(f"arm {arm.name}: {len(arm.sites)} site(s) ({', '.join(s.name for s in arm.sites)}), {arm.strategy}, "
        f"{c.rounds} rounds x {local} local steps x batch {c.batch_size}"
        + (f", DP epsilon {arm.epsilon:g}" if arm.epsilon is not None else ""))
    folder = write_configs(arm, c, out / "configs")
    with config_folder(folder):
        data = {s.name: site_folder(s, root) for s in arm.sites}
        fed = run_local_federation(out, sites=[s.name for s in arm.sites], rounds=c.rounds, local_steps=local,
                                   overrides=[f"model={c.model}", f"data.batch_size={c.batch_size}"],
                                   strategy=arm.strategy, timeout_s=max(900.0, 3.0 * c.rounds * c.steps_per_round),
                                   log=lambda m: log(f"  {m}"), data_dirs=data)
    rows = fed["rounds"]
    last = {s["site"]: s for r in rows for s in r["sites"]}  # each site's latest line
    summary = {"arm": arm.name, "settings": c.part(c.PRETRAINING), "group": arm.group, "strategy": arm.strategy,
               "epsilon_target": arm.epsilon, "held_out": arm.held_out, "vendors": arm.vendors,
               "sites": [asdict(s) for s in arm.sites],
               "samples": sum(s["num_examples"] for r in rows for s in r["sites"]),
               "site_epsilon": {name: s.get("epsilon") for name, s in last.items()},
               "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"], "rounds": len(rows),
               "dropped": sum(len(r["dropped"]) for r in rows), "encoder": fed["encoder"],
               "seconds": round(time.monotonic() - t0, 1)}
    done.write_text(json.dumps(summary, indent=1))
    return summary


def score_arms(arms: Sequence[dict], c: CompareConfig, root: Path, log: Log = _log.info) -> tuple[dict, dict]:
    """Scores of every pretrained arm and the two controls (scores/<arm>.json is reused), and the
    non-deep baselines. A lovo task is scored only for arms whose pretraining never saw its vendor."""
    cfg = load_config([f"model={c.model}", f"finetune.seeds=[{','.join(map(str, c.seeds))}]",
                       f"finetune.label_sizes=[{','.join(map(str, c.label_sizes))}]"])
    folder, settings = root / "scores", c.part(c.DOWNSTREAM)
    folder.mkdir(parents=True, exist_ok=True)

    @functools.cache
    def panel() -> Panel:  # the benchmarks are simulated only when a score is missing
        return Panel(cfg, resolve_device(cfg.device), ("vendor", "quant"), c.lovo, c.subjects_per_vendor,
                     c.lovo_subjects, log=log)

    scores = {}
    starts = [(a["arm"], a["encoder"], a["vendors"]) for a in arms]
    starts += [("random_init", RANDOM_INIT, []), ("scratch", None, [])]
    for name, encoder, seen in starts:
        path = folder / f"{name}.json"
        saved = _reuse(path, settings, ignore=("modes",)) if path.is_file() else {"settings": {"modes": []}, "rows": []}
        done = saved["settings"].get("modes") or []
        todo = [m for m in c.modes if m not in done]  # a mode added to a finished comparison is scored alone
        if todo:
            t0 = time.monotonic()
            tasks = [t.name for t in panel().tasks if not (t.name.startswith("lovo_") and t.name[5:] in seen)]
            saved = {"settings": {**settings, "modes": [*done, *todo]},
                     "rows": saved["rows"] + panel().score(encoder, todo, tasks)}
            path.write_text(json.dumps(saved))
            log(f"scored {name} ({', '.join(tasks)}; {', '.join(todo)}) in {time.monotonic() - t0:.0f} s")
        scores[name] = [r for r in saved["rows"] if r["mode"] in c.modes]
    path = folder / "baselines.json"
    if not path.is_file():
        path.write_text(json.dumps({"settings": settings, "rows": panel().baselines()}))
    return scores, _reuse(path, settings, ignore=("modes",))["rows"]


def _reuse(path: Path, settings: dict, ignore: Sequence[str] = ()) -> dict:
    """A finished arm's or score's file, when it was made with these settings (but for `ignore`);
    one line otherwise."""
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: unreadable ({path.stat().st_size} bytes); delete it to redo that step") from None
    made = saved.get("settings") or {}
    if any(made.get(k) != v for k, v in settings.items() if k not in ignore):
        differ = sorted(k for k in settings if k not in ignore and made.get(k) != settings[k])
        raise ValueError(f"{path}: made with other compare settings ({', '.join(differ)}); "
                         "use a new --out, or delete that file to redo the step")
    return saved


# -- the report ----------------------------------------------------------------------------------------
def _cell(rows: list[dict], task: str, mode: str, n: int) -> dict | None:
    return next((r for r in rows if r["task"] == task and r["mode"] == mode and r["n_labels"] == n), None)


def paired(scores: dict, a: str, b: str, task: str, mode: str, n: int, metric: str) -> dict | None:
    """a minus b per seed (same labelled sample), mean and 95% interval, and the ratio of the means."""
    ra, rb = _cell(scores.get(a, []), task, mode, n), _cell(scores.get(b, []), task, mode, n)
    if ra is None or rb is None:
        return None
    d = [x[metric] - y[metric] for x, y in zip(ra["per_seed"], rb["per_seed"])]
    ma, mb = ra["metrics"][metric]["mean"], rb["metrics"][metric]["mean"]
    return {"arm": a, "minus": b, "task": task, "mode": mode, "n_labels": n, "metric": metric,
            "a": ma, "b": mb, "ratio": ma / mb if mb > 0 else None, "per_seed": d, **mean_ci95(d)}


def comparisons(scores: dict, arms: Sequence[dict], c: CompareConfig) -> tuple[list[dict], dict]:
    """The paired differences the issue's questions need, and each target's verdict."""
    singles = [a["arm"] for a in arms if a["group"] == "single"]
    out, targets = [], {}

    def cells(*tasks: str) -> list[tuple[str, str, int, str]]:  # (task, mode, labels, metric): one figure each
        return [(t, m, n, k) for t in tasks for m in c.modes for n in c.label_sizes for k in task_metrics(t)]

    def best_single(task, mode, n, metric, allowed):
        cand = [(r["metrics"][metric]["mean"], s) for s in allowed
                if (r := _cell(scores.get(s, []), task, mode, n)) is not None]
        return max(cand)[1] if cand else None

    for t, m, n, k in cells("vendor", "quant"):
        for other in ("centralized", best_single(t, m, n, k, singles), *CONTROLS):
            if other and (p := paired(scores, MAIN, other, t, m, n, k)):
                out.append({**p, "question": "federated vs " + ("best single site" if other in singles else other)})
    ratios = [p for p in out if p["minus"] == "centralized"]
    if ratios:  # (a centralized figure <= 0, an R² no better than the mean, has no ratio: there, at least as good)
        ok = [p["ratio"] >= 0.98 if p["ratio"] is not None else p["a"] >= p["b"] for p in ratios]
        worst = min(ratios, key=lambda p: p["ratio"] if p["ratio"] is not None else p["mean"])
        targets["federated_vs_centralized"] = {"target": ">= 0.98 x centralized on every figure", "worst": worst,
                                               "met": all(ok), "figures_met": f"{sum(ok)}/{len(ok)}"}
    for v in c.lovo:
        task, fed = f"lovo_{v}", f"lovo_{v.lower()}_federated"
        allowed = [s for s in singles if s != f"single_{v.lower()}"]
        lovo = []
        for t, m, n, k in cells(task):
            for other in (best_single(t, m, n, k, allowed), f"lovo_{v.lower()}_centralized", *CONTROLS):
                if other and (p := paired(scores, fed, other, t, m, n, k)):
                    q = "best single site" if other in allowed else other
                    lovo.append({**p, "question": f"leave-{v}-out: federated vs {q}"})
        out += lovo
        at100 = [p for p in lovo if p["n_labels"] == max(c.label_sizes) and p["minus"] in allowed]
        if at100:
            targets[f"lovo_{v}_federated_vs_best_single"] = {
                "target": f">= best single site + 0.05 at {max(c.label_sizes)} labels", "figures": at100,
                "met": all(p["mean"] >= 0.05 for p in at100)}
    dp = []
    for e in c.epsilons:
        for t, m, n, k in cells("vendor", "quant"):
            if p := paired(scores, f"dp_eps{e:g}", MAIN, t, m, n, k):
                dp.append({**p, "question": f"price of privacy at epsilon {e:g}", "epsilon": e})
    out += dp
    if cheap := [p for p in dp if p["epsilon"] <= 8]:
        targets["dp_cost_at_eps_le_8"] = {"target": "costs <= 0.03", "worst": min(cheap, key=lambda p: p["mean"]),
                                          "met": all(p["mean"] >= -0.03 for p in cheap)}
    het = [a["arm"] for a in arms if a["group"] == "heterogeneity"]
    for t, m, n, k in cells("vendor", "quant"):
        for a in het:
            if p := paired(scores, a, MAIN, t, m, n, k):
                out.append({**p, "question": "heterogeneous sites vs even sites"})
        if len(het) > 1 and (p := paired(scores, het[1], het[0], t, m, n, k)):
            out.append({**p, "question": "robust strategy vs fedavg on heterogeneous sites"})
    return out, targets


def write_report(root: Path, arms: Sequence[dict], scores: dict, baselines: dict, c: CompareConfig) -> dict:
    pairs, targets = comparisons(scores, arms, c)
    result = {"settings": asdict(c), "arms": list(arms), "scores": scores, "baselines": baselines,
              "paired": pairs, "targets": targets}
    (root / "compare.json").write_text(json.dumps(result, indent=1))
    with open(root / "compare.jsonl", "w") as f:
        for a in arms:
            f.write(json.dumps({"kind": "arm", **{k: a[k] for k in ("arm", "group", "samples", "site_epsilon",
                                                                   "final_loss", "seconds")}}) + "\n")
        for name, rows in {**scores, **baselines}.items():
            for r in rows:
                f.write(json.dumps({"kind": "score", "arm": name, "task": r["task"], "mode": r["mode"],
                                    "n_labels": r["n_labels"], "metrics": r["metrics"]}) + "\n")
        for p in pairs:
            f.write(json.dumps({"kind": "paired", **p}) + "\n")
        for name, t in targets.items():
            f.write(json.dumps({"kind": "target", "name": name, "met": t["met"], "target": t["target"]}) + "\n")
    (root / "compare.md").write_text(table(arms, scores, baselines, c, targets))
    plot(root / "compare.png", arms, scores, baselines, c)
    return result


def table(arms: Sequence[dict], scores: dict, baselines: dict, c: CompareConfig, targets: dict) -> str:
    """Markdown: one row per arm, one column per task figure and label size (mean ± 95% interval)."""
    tasks = ["vendor", "quant", *(f"lovo_{v}" for v in c.lovo)]
    info = {a["arm"]: a for a in arms}
    lines = []
    for mode in c.modes:
        # the head modes answer the quantification tasks only (the pretrained model's own estimates)
        cols = [(t, k, n) for t in tasks if not (mode in HEAD_MODES and t == "vendor")
                for k in task_metrics(t) for n in c.label_sizes]
        lines += [f"Downstream ({mode}; {len(c.seeds)} paired seeds; accuracy for vendor, R² otherwise)", "",
                  "| arm | samples | site epsilon | " + " | ".join(f"{t} {k.removeprefix('r2_')} @{n}"
                                                                  for t, k, n in cols) + " |",
                  "|" + " --- |" * (len(cols) + 3)]
        for name, rows in [*scores.items(), *baselines.items()]:
            a = info.get(name, {})
            eps = ", ".join(f"{s} {e:.2f}" for s, e in (a.get("site_epsilon") or {}).items() if e is not None)
            cells = []
            for t, k, n in cols:
                r = _cell(rows, t, mode if name in scores else "baseline", n)
                cells.append(f"{r['metrics'][k]['mean']:.3f} ± {r['metrics'][k]['ci95']:.3f}" if r else "–")
            lines.append(f"| {name} | {a.get('samples', '–')} | {eps or '–'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Targets:", ""] + [f"- {name}: {t['target']}: {'met' if t['met'] else 'MISSED'}"
                                 for name, t in targets.items()]
    return "\n".join(lines) + "\n"


def plot(path: Path, arms: Sequence[dict], scores: dict, baselines: dict, c: CompareConfig) -> Path:
    """Left: vendor accuracy against labels, every arm; right: downstream score against epsilon."""
    from mrsfm_model.reports.plots import plt

    mode, n_max = c.modes[0], max(c.label_sizes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in [*scores.items(), *baselines.items()]:
        pts = [(n, r["metrics"]["accuracy"]["mean"]) for n in c.label_sizes
               if (r := _cell(rows, "vendor", mode if name in scores else "baseline", n))]
        if pts:
            left.plot(*zip(*pts), marker="o", ls="-" if name in scores else ":", label=name)
    left.set_xlabel("labelled spectra")
    left.set_ylabel(f"vendor accuracy ({mode})")
    left.legend(fontsize=6, ncol=2)
    dp = sorted((a["epsilon_target"], a["arm"]) for a in arms if a["group"] == "privacy")
    if dp and MAIN in scores:
        xs = [e for e, _ in dp] + [2 * max(e for e, _ in dp)]
        for task, metric in (("vendor", "accuracy"), ("quant", "r2_NAA/tCr"), ("quant", "r2_GABA/tCr")):
            ys = [_cell(scores[a], task, mode, n_max) for a in [x for _, x in dp] + [MAIN]]
            if all(ys):
                right.errorbar(xs, [y["metrics"][metric]["mean"] for y in ys],
                               yerr=[y["metrics"][metric]["ci95"] for y in ys], marker="o", capsize=3,
                               label=f"{task} {metric}")
        right.set_xscale("log")
        right.set_xticks(xs, [f"{e:g}" for e, _ in dp] + ["no DP"])
        right.set_xlabel("epsilon (each site's budget)")
        right.set_ylabel(f"score at {n_max} labels")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(out: str | Path, overrides: Sequence[str] = (), log: Log = _log.info) -> dict:
    """Every arm, then every score, then the report; see the module docstring."""
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(list(overrides))
    c = CompareConfig.from_config(cfg.compare)
    plan = plan_arms(c)
    (root / "settings.json").write_text(json.dumps(asdict(c), indent=1))
    log(f"{len(plan)} pretraining arm(s) + controls {', '.join(CONTROLS)}; each {c.rounds} rounds, "
        f"{c.rounds * c.steps_per_round * c.batch_size} training samples; results under {root}")
    arms = [run_arm(arm, c, root, log) for arm in plan]
    samples = {a["arm"]: a["samples"] for a in arms}
    if len(set(samples.values())) > 1:  # a site dropped out of a round: reported, not hidden
        log(f"WARNING: arms trained on different numbers of samples (a site missed a round): {samples}")
    scores, baselines = score_arms(arms, c, root, log)
    result = write_report(root, arms, scores, baselines, c)
    log((root / "compare.md").read_text())
    log(f"results: {root / 'compare.md'}, compare.json, compare.jsonl, compare.png")
    return result
