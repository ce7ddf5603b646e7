"""`mrsfm` command line: one entry point, one subcommand per job.

Bad input ends in one line `mrsfm <cmd>: error: FILE: problem` and a non-zero exit, never a
traceback from inside a library. Trailing `key=value` words are Hydra overrides of configs/.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from mrsfm_model import logs
from mrsfm_model.errors import MRSDataError

# Subcommands other installed packages add: an entry point `name = "module:register"`, where
# register(subparsers) adds its parser with `func(args, overrides) -> exit code` as default. The
# federation's `mrsfm demo` comes this way, so the science package never imports server/ or client/.
COMMANDS = "mrsfm.commands"


def _split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra `key=value` overrides from ordinary arguments."""
    over = [w for w in words if "=" in w and not w.startswith("-")]
    return [w for w in words if w not in over], over


def _data_setup(overrides: Sequence[str]):
    """The composed config and its spectrum -> image recipe (data.InputBuilder)."""
    from mrsfm_model.config import load_config
    from mrsfm_model.data.stream import InputBuilder

    cfg = load_config(overrides)
    return cfg, InputBuilder.from_data_config(cfg.data)


def cmd_inspect(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.data.io import load_spectrum
    from mrsfm_model.data.quality import measure
    from mrsfm_model.data.spectrum import peak_ppm

    cfg, builder = _data_setup(overrides)
    spec = load_spectrum(args.file)
    canon = builder.canonical(spec)
    quality = measure(canon)
    p = spec.provenance
    info = {
        "file": str(args.file),
        "vendor": p.vendor,
        "field_t": None if p.field_t is None else round(p.field_t, 3),
        "spectrometer_frequency_mhz": spec.spectrometer_mhz,
        "bandwidth_hz": spec.bandwidth_hz,
        "points": p.points or spec.points,
        "dims": list(p.dims),
        "sub_spectra": list(spec.sub),
        "te_ms": p.te_ms,
        "tr_ms": p.tr_ms,
        "naa_ppm": round(peak_ppm(canon), 3),
        "snr": round(quality.snr, 1),
        "naa_fwhm_hz": round(quality.naa_fwhm_hz, 1),
    }
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    if args.png:
        from mrsfm_model.reports.plots import plot_spectrum_and_spectrogram

        image = builder.prepare(spec).image.numpy()
        out = plot_spectrum_and_spectrogram(canon, image, builder.channels, builder.spec_cfg, builder.grid, args.png)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.data.io import convert_files

    written, errors = convert_files(args.inputs, args.out)
    for path in written:
        print(f"wrote {path}")
    for err in errors:
        print(f"mrsfm convert: error: {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_simulate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.config import resolve_device
    from mrsfm_model.data.simulate import write_simulated

    cfg, builder = _data_setup(overrides)
    if args.study:
        from mrsfm_model.data.cohort import write_cohort

        labels = write_cohort(args.profile.split(","), args.n, args.out, seed=args.seed, grid=builder.grid)
        print(f"wrote a study of {args.n} subjects per profile (half lesion) to {args.out}; labels in {labels}")
        return 0
    device = resolve_device(args.device or cfg.device)
    paths = write_simulated(args.profile, args.n, args.out, seed=args.seed, grid=builder.grid, device=device)
    print(f"wrote {len(paths)} NIfTI-MRS files (+ JSON ground truth) to {args.out}")
    return 0


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.config import load_config
    from mrsfm_model.training.pretrain import run_pretrain

    run_pretrain(load_config(overrides))
    return 0


def cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.config import load_config, resolve_device
    from mrsfm_model.evaluation.finetune import run_benchmark
    from mrsfm_model.model.export import STUDY_NAME, resolve_encoder, shipped

    cfg = load_config(overrides)
    study = bool(args.data or args.labels or args.target)
    if args.encoder is None:  # the packaged pretrained encoder (a study's default: the better one on studies)
        args.encoder = shipped(name=STUDY_NAME) if study else shipped()
    elif str(args.encoder).lower() == "none":  # no pretrained arm: scratch and baselines only
        args.encoder = None
    else:
        args.encoder = resolve_encoder(args.encoder)
        if not args.encoder.is_file():
            raise MRSDataError(args.encoder, "encoder file not found")
    if study:
        missing = [f"--{n}" for n in ("data", "labels", "target") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"study fine-tuning needs {', '.join(missing)} as well (--data DIR --labels CSV --target COLUMN)")
        from mrsfm_model.evaluation.study import run_study

        run_study(cfg, args.encoder, args.data, args.labels, args.target, args.out or Path(cfg.run_dir) / "study",
                  resolve_device(cfg.device), task=args.task)
        return 0
    if args.task:
        raise ValueError("--task applies only with --data/--labels/--target")
    out = args.out or Path(cfg.run_dir) / "finetune"
    run_benchmark(cfg, args.encoder, out, resolve_device(cfg.device))
    return 0


def _report_rows(command: str, rows: list[dict], errors: list, out: Path | None, what: str) -> int:
    """Rows as CSV on stdout (or a line saying where they went), then one line per unreadable file;
    exit code 1 when any file was unreadable."""
    from mrsfm_model.evaluation.predict import write_predictions

    if out is None:
        write_predictions(rows, sys.stdout)
    else:
        print(f"wrote {what} to {out}", file=sys.stderr)
    for err in errors:
        print(f"mrsfm {command}: error: {err}", file=sys.stderr)
    return 1 if errors else 0


def cmd_predict(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.config import load_config, resolve_device
    from mrsfm_model.evaluation.predict import predict_files

    cfg = load_config(overrides)
    rows, errors = predict_files(args.model, args.inputs, args.out, resolve_device(cfg.device))
    return _report_rows("predict", rows, errors, args.out, f"{len(rows)} predictions")


def cmd_quantify(args: argparse.Namespace, overrides: list[str]) -> int:
    from mrsfm_model.config import load_config, resolve_device
    from mrsfm_model.evaluation.predict import quantify_files
    from mrsfm_model.model.export import QUANTIFIER_NAME, resolve_encoder, shipped

    cfg = load_config(overrides)
    encoder = resolve_encoder(args.encoder) if args.encoder else shipped(name=QUANTIFIER_NAME)
    rows, errors = quantify_files(encoder, args.inputs, args.out, resolve_device(cfg.device))
    return _report_rows("quantify", rows, errors, args.out, f"estimates for {len(rows)} spectra")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrsfm", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=logs.LEVELS,
                        help="messages of the `mrsfm` logger tree shown (default INFO; WARNING: results only)")
    subs = parser.add_subparsers(dest="command", required=True)

    p = subs.add_parser("inspect", help="show provenance, NAA position and (optionally) a figure of one file")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", type=Path, help="write spectrum + spectrogram figure here")
    p.set_defaults(func=cmd_inspect)

    p = subs.add_parser("convert", help="convert vendor files (or NIfTI-MRS) to NIfTI-MRS")
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_convert)

    p = subs.add_parser("simulate", help="write simulated in vivo-like spectra as NIfTI-MRS + JSON truth")
    p.add_argument("--n", type=int, required=True, help="spectra (with --study: subjects per profile)")
    p.add_argument("--profile", required=True,
                   help="name in configs/simulation/ or a YAML path (with --study: a comma-separated list, one per vendor)")
    p.add_argument("--study", action="store_true",
                   help="a labelled control-vs-lesion study (configs/simulation/_cohort.yaml) with labels.csv, "
                        "for `mrsfm finetune --data DIR --labels DIR/labels.csv --target condition`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: config's device)")
    p.set_defaults(func=cmd_simulate)

    p = subs.add_parser("pretrain", help="central MAE pretraining (Hydra overrides: train.steps=..., model=base, ...)")
    p.set_defaults(func=cmd_pretrain)

    p = subs.add_parser("finetune", help="few-label fine-tuning benchmark: pretrained encoder vs random init")
    p.add_argument("--encoder", type=Path,
                   help="encoder.safetensors from pretrain/export, or a shipped model's name (micro, tiny) "
                        "(default: the shipped micro encoder, tiny for a study's --data/--labels; 'none': scratch and "
                        "baselines only)")
    p.add_argument("--out", type=Path, help="result folder (default: RUN_DIR/finetune, or RUN_DIR/study)")
    p.add_argument("--data", type=Path, help="study folder of spectra in any readable format (with --labels, --target)")
    p.add_argument("--labels", type=Path,
                   help="CSV: 'file' (path relative to --data), label columns, optional 'group' (e.g. subject)")
    p.add_argument("--target", help="label column to learn")
    p.add_argument("--task", choices=["classification", "regression"],
                   help="default: text labels -> classification, numbers -> regression")
    p.set_defaults(func=cmd_finetune)

    p = subs.add_parser("predict", help="apply a model from `mrsfm finetune --data` to spectra files or folders")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="predictions CSV (default: CSV on stdout)")
    p.set_defaults(func=cmd_predict)

    p = subs.add_parser("quantify", help="metabolite ratios to tCr, linewidths and SNR from the pretrained model's "
                                         "own head (no labels; simulation-trained, see docs/results.md)")
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--encoder", type=Path, help="encoder.safetensors with a latent head, or a shipped model's name "
                                                 "(micro, tiny) (default: the shipped tiny encoder, the better quantifier)")
    p.add_argument("--out", type=Path, help="estimates CSV (default: CSV on stdout)")
    p.set_defaults(func=cmd_quantify)

    for ep in sorted(entry_points(group=COMMANDS), key=lambda e: e.name):  # e.g. `demo`, from the federation
        ep.load()(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(words)
    logs.setup(args.log_level)
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    try:
        return func(args, overrides)
    except MRSDataError as exc:
        print(f"mrsfm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        print(f"mrsfm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mrsfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
