"""Command line: ``python -m reference_pipeline <command> [--config FILE] [--set key=value ...]``.

Commands (each reads the run directory the previous ones wrote, so they can run one by one):

* ``run`` — the whole method on any config: the teacher (pretrained first if it is a pipeline model),
  its zero-shot evaluation, ``adapt-teacher``, ``distill``, ``refine``, the supervised-only ``baseline``,
  each evaluated, and ``report.md`` with plots.
* ``demo`` — ``run`` on ``configs/demo.yaml`` (the built-in dataset).
* ``show-config`` — print the fully resolved config (defaults + file + ``--set``) as YAML.
* ``adapt-teacher``, ``distill``, ``refine``, ``baseline`` — one stage each.
* ``evaluate`` — mask AP of the trained models on the validation split.
* ``predict`` — a trained model on a folder of images: overlays + COCO-format results JSON.
* ``export`` — a trained student to ONNX, checked against PyTorch with onnxruntime.
* ``compare-sampling`` — the sampling strategies on fixed predictions (FNR, margins, plots).
* ``ablate`` — the paper's ablations at small scale (see ``configs/ablations.yaml``).

Every command continues what its run directory holds: finished stages are skipped and an interrupted
one continues exactly where it stopped. ``--no-resume`` recomputes instead: the outputs of what the
command runs are removed first (the same meaning for every command, ``ablate`` included).

Errors a user can fix (:class:`~reference_pipeline.errors.UserError`: bad config keys, missing files,
a run directory holding another run, unreadable images) are printed as one line without a traceback;
``--debug`` shows the traceback. Any other error keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .stage_names import STAGES

__all__ = ["build_parser", "main"]

logger = logging.getLogger("reference_pipeline")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config (default: configs/demo.yaml, the built-in dataset)")
    parser.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set distill.train.steps=200 (repeatable; nested keys with dots)",
    )
    parser.add_argument("--run-dir", help="shortcut for --set run_dir=PATH")
    parser.add_argument("--no-resume", action="store_true",
                        help="recompute: remove the outputs of what this command runs first (default: continue the run "
                             "directory, skipping finished stages and resuming an interrupted one)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds per stage): a smoke test")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="python -m reference_pipeline",
        description="Three-stage semi-supervised distillation with an instance-aware pixel contrastive loss.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "the whole method on --config: teacher, zero-shot eval, the three stages, baseline, report.md",
        "demo": "`run` on configs/demo.yaml (the built-in dataset)",
        "show-config": "print the fully resolved config (defaults + --config + --set) as YAML",
        "adapt-teacher": "stage 1: fine-tune, pseudo-label, self-train the teacher",
        "distill": "stage 2: distill the adapted teacher into the student",
        "refine": "stage 3: fine-tune the student on labeled data",
        "baseline": "the supervised-only student (same budget as distill + refine)",
        "evaluate": "mask AP of trained models on the validation split",
        "predict": "run a trained model on a folder of images (overlays + COCO results JSON)",
        "export": "export the trained student to ONNX and verify it with onnxruntime",
        "compare-sampling": "compare negative-sampling strategies on fixed predictions",
        "ablate": "the paper's ablations at small scale, over seeds, with ablations.md",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        if name == "compare-sampling":
            sub.add_argument("args", nargs=argparse.REMAINDER, help="arguments of examples/compare_sampling.py")
            continue
        _add_common(sub)
        stage_names = [s.name for s in STAGES]
        if name == "evaluate":
            sub.add_argument("--stage", action="append", choices=stage_names,
                             help="stage(s) to evaluate (repeatable; default: every trained one)")
        if name == "predict":
            sub.add_argument("images", help="folder of images")
            sub.add_argument("--out", required=True, help="output folder (overlays + results.json)")
            sub.add_argument("--stage", default="refine", choices=stage_names, help="which trained model (default: refine)")
            sub.add_argument("--model", help="a trained model's folder (model.safetensors + config.json) instead of "
                                             "--stage; needs no config or dataset")
            sub.add_argument("--annotations", help="COCO JSON holding these images: results take its image ids")
            sub.add_argument("--score-threshold", type=float, default=0.5, help="draw predictions above this score")
        if name == "export":
            sub.add_argument("--stage", default="refine", choices=[s.name for s in STAGES if s.model == "student"],
                             help="which trained student (default: refine)")
            sub.add_argument("--model", help="a trained student's folder instead of --stage; needs no config or dataset")
            sub.add_argument("--out", help="ONNX file (default: <run_dir>/student.onnx, or <model>/model.onnx)")
        if name == "ablate":
            sub.add_argument("--only", action="append", help="tables to run, e.g. --only table4 (repeatable)")
            sub.add_argument("--seeds", type=int, help="seeds per cell (default from the ablation config)")
    return parser


def _load(args: argparse.Namespace) -> Any:
    """The run's :class:`~reference_pipeline.config.PipelineConfig` from ``--config``/``--quick``/``--set``."""
    from .config import QUICK_OVERRIDES, load_pipeline_config

    config = args.config or _default_config()
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.quick:
        overrides.append("run_dir=runs/quick")
    overrides += list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_pipeline_config(config, overrides)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg


def _default_config() -> str:
    return str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _cmd_run(args: argparse.Namespace) -> None:
    from .run import run_method

    cfg = _load(args)
    report = run_method(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(f"report: {report}")


def _cmd_show_config(args: argparse.Namespace) -> None:
    import yaml

    from .config import config_to_dict

    print(yaml.safe_dump(config_to_dict(_load(args)), sort_keys=False), end="")


def _stage_command(name: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from . import stages

        cfg = _load(args)
        datasets = stages.load_datasets(cfg, progress=not args.no_progress)
        function = {
            "adapt-teacher": stages.adapt_teacher,
            "distill": stages.distill,
            "refine": stages.refine,
            "baseline": stages.supervised_baseline,
        }[name]
        start = time.perf_counter()
        function(cfg, datasets, resume=not args.no_resume, progress=not args.no_progress)
        print(f"{name}: done in {time.perf_counter() - start:.1f} s; outputs under {cfg.run_dir}")

    return run


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from . import stages
    from .data.loading import load_validation
    from .trained import CARD_FILE

    cfg = _load(args)
    trained = [s.name for s in STAGES if (cfg.run_path / s.name / stages.WEIGHTS_FILE).is_file()]
    names = args.stage or ["teacher_zero_shot", *trained]
    val = load_validation(cfg, progress=not args.no_progress)  # a trained model's folder names its classes
    datasets = None
    for name in names:
        if name != "teacher_zero_shot" and (cfg.run_path / name / CARD_FILE).is_file():
            metrics = stages.evaluate_trained(cfg, name, val, progress=not args.no_progress)
        else:  # the zero-shot teacher (or a folder from before models described themselves) needs the whole data
            datasets = datasets or stages.load_datasets(cfg, progress=not args.no_progress)
            metrics = stages.evaluate_stage(cfg, datasets, name, progress=not args.no_progress)
        print(f"{name:20s} AP {metrics['AP']:6.2f}  AP50 {metrics['AP50']:6.2f}  params {metrics['parameters'] / 1e6:6.2f}M")


def _model_folder(args: argparse.Namespace) -> Path:
    """``--model`` as given, else the ``--stage`` folder of the config's run directory."""
    if args.model:
        return Path(args.model)
    if args.stage == "teacher_zero_shot":
        raise UserError("teacher_zero_shot is not a trained folder; pick a trained stage or --model FOLDER")
    return _load(args).run_path / args.stage


def _cmd_predict(args: argparse.Namespace) -> None:
    from .predict import predict_folder

    out = predict_folder(_model_folder(args), Path(args.images), Path(args.out),
                         annotations=Path(args.annotations) if args.annotations else None,
                         score_threshold=args.score_threshold, progress=not args.no_progress)
    print(f"predictions: {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_onnx

    folder = _model_folder(args)
    default = folder / "model.onnx" if args.model else folder.parent / "student.onnx"  # folder: <run_dir>/<stage>
    path = Path(args.out) if args.out else default
    result = export_onnx(folder, path)
    print(f"exported {result.path} (max |onnx - torch| = {result.max_abs_diff:.2e})")


def _cmd_compare_sampling(args: argparse.Namespace) -> None:
    import runpy

    script = Path(__file__).resolve().parents[1] / "examples" / "compare_sampling.py"
    sys.argv = [str(script), *[a for a in args.args if a != "--"]]
    runpy.run_path(str(script), run_name="__main__")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from .ablate import run_ablations

    config = args.config or str(Path(__file__).resolve().parents[1] / "configs" / "ablations.yaml")
    report = run_ablations(config, overrides=args.overrides, only=args.only, seeds=args.seeds, quick=args.quick,
                           resume=not args.no_resume, progress=not args.no_progress, run_dir=args.run_dir)
    print(f"report: {report}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "run": _cmd_run,
    "demo": _cmd_run,  # with configs/demo.yaml, the default --config
    "show-config": _cmd_show_config,
    "adapt-teacher": _stage_command("adapt-teacher"),
    "distill": _stage_command("distill"),
    "refine": _stage_command("refine"),
    "baseline": _stage_command("baseline"),
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "export": _cmd_export,
    "compare-sampling": _cmd_compare_sampling,
    "ablate": _cmd_ablate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the process exit code (2 for a user error, printed without a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .engine import cleanup_distributed, init_distributed

    info = None
    try:
        info = init_distributed()  # under torchrun: one process group for every stage of the command
        COMMANDS[args.command](args)
        if info.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank finished: tear the group down together
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if getattr(args, "debug", False):
            raise
        _report(f"error{_rank_tag(info)}: {error}", info)
        return 2
    except Exception as error:  # under torchrun: one line per failing rank instead of a traceback from each
        if getattr(args, "debug", False) or info is None or not info.distributed:
            raise
        _report(f"error{_rank_tag(info)}: {type(error).__name__}: {_first_line(error)} (--debug shows the traceback)",
                info)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
    return 0


def _rank_tag(info: Any) -> str:
    """`` on rank r of N`` under torchrun (each rank reports its own error), empty for one process."""
    return f" on rank {info.rank} of {info.world_size}" if info is not None and info.distributed else ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _report(line: str, info: Any) -> None:
    """Print a rank's one-line error, once per torchrun launch: the first failing rank speaks.

    The ranks usually fail alike (the same config, the same missing folder); a counter in torchrun's
    store (which outlives the ranks) lets the first one print and the others stay silent. A rank-local
    failure is first by definition, so it is never hidden.
    """
    if info is not None and info.distributed:
        try:
            import torch.distributed as dist

            if dist.distributed_c10d._get_default_store().add("reference_pipeline/errors", 1) != 1:
                return
        except Exception:  # no store reachable: print rather than hide the error
            pass
    print(line, file=sys.stderr, flush=True)
