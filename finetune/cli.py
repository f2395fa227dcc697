"""`python -m finetune <command>`: the project's commands in one place.

The DVC stages of dvc.yaml are the modules of finetune/stages/, named like them (`python -m
finetune train ...` is `python -m finetune.stages.train ...`; `dvc stage list` lists them); the
tools below work on the registry, the served model and the demo. Each reads params.yaml, calls
one library function and prints its result; errors the user can act on are printed as one
paragraph (no traceback) with exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from finetune.core.command import execute, parser
from finetune.core.config import Params
from finetune.ports import check_free

# The project's pipeline, where the stages' one-line summaries are (`desc:`): this checkout's, else
# the current folder's (an installed package has none of its own).
PIPELINE_FILES = (Path(__file__).resolve().parents[1] / "dvc.yaml", Path("dvc.yaml"))


def stage_names() -> list[str]:
    """The DVC stages: the modules of finetune/stages (each named like its stage), found without
    importing them (they import torch and MLflow: each is imported only when it runs)."""
    from finetune import stages

    return sorted(module.name for module in pkgutil.iter_modules(stages.__path__))


def pipeline_stages(path: Path) -> dict[str, str]:
    """The stages of dvc.yaml ``path`` in its order, each with its ``desc`` ("" without one; {}
    when the file cannot be read as a pipeline: a summary is not worth failing a command for)."""
    try:
        defined = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]
        return {str(name): str(stage.get("desc") or (stage.get("do") or {}).get("desc") or "")
                for name, stage in defined.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}


def stage_summaries() -> dict[str, str]:
    """Each DVC stage and its one-line summary (dvc.yaml's ``desc``), in pipeline order where
    dvc.yaml is found, else by name."""
    found = next((path for path in PIPELINE_FILES if path.is_file()), None)
    described = pipeline_stages(found) if found else {}
    order = list(described)
    names = sorted(stage_names(), key=lambda name: order.index(name) if name in order else len(order))
    return {name: described.get(name, "") for name in names}


STAGES = stage_summaries()


def cmd_promote(params: Params, args: argparse.Namespace) -> None:
    """Move ``production`` to the candidate only if it beats chance and production (register.min_improvement)."""
    from finetune.tracking.registry import promote

    d = promote(params, version=args.version, force=args.force)
    print(f"{d.action}: {d.model_name} production {_v(d.production_before)} -> {_v(d.production_after)}; {d.reason}")
    if args.json:  # for the flow's gate task: the recorded decision, without reading the log back
        print(json.dumps(dataclasses.asdict(d)), flush=True)


def cmd_rollback(params: Params, args: argparse.Namespace) -> None:
    """Move ``production`` back to the previous production version."""
    from finetune.tracking.registry import rollback

    d = rollback(params)
    print(f"{d.action}: {d.model_name} production {_v(d.production_before)} -> {_v(d.production_after)}")


def cmd_doctor(params: Params, args: argparse.Namespace) -> int:
    """Check that dvc.lock, models/, the MLflow runs and the registry agree; print each repair."""
    from finetune.tracking.doctor import diagnose

    findings = diagnose(params)
    for f in findings:
        print(f"{'problem' if f.fatal else 'note'}: {f.problem}\n  repair: {f.repair}")
    if any(f.fatal for f in findings):
        return 1
    print("all consistent")
    return 0


def _v(version: str | None) -> str:
    return f"v{version}" if version else "(none)"


def _model_uri(params: Params, args: argparse.Namespace) -> str:
    return args.model or f"models:/{params.register_.model_name}@production"


def cmd_predict(params: Params, args: argparse.Namespace) -> int:
    """Classify image files with a registered model (default: production), as the server would."""
    from finetune.tracking.serving import load_served, predict_files

    results = predict_files(load_served(_model_uri(params, args)), args.images)
    for result in results:
        print(json.dumps(result))
    return 1 if any("error" in r for r in results) else 0


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    """Serve a registered model (default: production) over REST (MLflow's scoring app, behind limits)."""
    from finetune.tracking.server import serve

    port = check_free("serve", args.port or params.ports.serve)  # before seconds of loading the model
    serve(_model_uri(params, args), params.serve.host, port, limits=params.serve)


def cmd_errors(params: Params, args: argparse.Namespace) -> None:
    """Draw the test images a registered model (default: production) gets wrong."""
    from finetune.tracking.serving import errors_of_model

    out, wrong, total = errors_of_model(params, _model_uri(params, args), args.out)
    print(f"{wrong} of {total} test images misclassified -> {out}")


def cmd_sample(params: Params, args: argparse.Namespace) -> None:
    """Write a generated archive of the hotdog.zip layout (settings from ``demo:``)."""
    from finetune.demo.sample import class_names, write_sample_archive

    demo = params.demo
    num_classes = args.classes or demo.num_classes
    summary = write_sample_archive(
        args.out, classes=class_names(num_classes), train_per_class=args.train or demo.train_per_class,
        test_per_class=args.test or demo.test_per_class, seed=demo.seed if args.seed is None else args.seed,
        root=args.root or ("hotdog" if num_classes == 2 else "chairs"), min_side=demo.min_side,
        max_side=demo.max_side)
    print(f"{summary.path}: sha256:{summary.sha256} {summary.counts}")


def cmd_demo_setup(params: Params, args: argparse.Namespace) -> None:
    """Create or refresh the offline demo's workspace and its generated dataset."""
    from finetune.demo.setup import setup_demo

    workspace = setup_demo(params, Path.cwd())
    print(f"demo workspace ready: {workspace} (its params.yaml points data.url at the generated archive)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per stage (its arguments parsed by the stage) and tool."""
    result = parser("python -m finetune", __doc__)
    sub = result.add_subparsers(dest="command", required=True)
    for name, summary in STAGES.items():  # their arguments (and --help) go to the stage's own parser
        sub.add_parser(name, help=f"DVC stage: {summary or f'python -m finetune.stages.{name}'}", add_help=False)
    sample = sub.add_parser("sample", help=cmd_sample.__doc__)
    sample.add_argument("--out", type=Path, required=True, help="zip file to write")
    sample.add_argument("--classes", type=int, help="number of classes (default: demo.num_classes)")
    sample.add_argument("--train", type=int, help="train images per class (default: demo.train_per_class)")
    sample.add_argument("--test", type=int, help="test images per class (default: demo.test_per_class)")
    sample.add_argument("--seed", type=int, help="random seed (default: demo.seed)")
    sample.add_argument("--root", help="top folder in the archive (default: hotdog, or chairs)")
    sample.set_defaults(func=cmd_sample)
    sub.add_parser("demo-setup", help=cmd_demo_setup.__doc__).set_defaults(func=cmd_demo_setup)
    _registry_commands(sub)
    return result


def _registry_commands(sub) -> None:
    """promote, rollback, doctor, predict, serve, errors."""
    promote = sub.add_parser("promote", help=cmd_promote.__doc__)
    promote.add_argument("--version", help="promote this version instead of @candidate")
    promote.add_argument("--force", action="store_true",
                         help="promote even if production scores better (recorded); never a model at chance")
    promote.add_argument("--json", action="store_true", help="also print the decision as one JSON line")
    promote.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help=cmd_rollback.__doc__).set_defaults(func=cmd_rollback)
    sub.add_parser("doctor", help=cmd_doctor.__doc__).set_defaults(func=cmd_doctor)
    model_help = "MLflow model URI (default: models:/<register.model_name>@production)"
    predict = sub.add_parser("predict", help=cmd_predict.__doc__)
    predict.add_argument("images", type=Path, nargs="+", help="image files (any size, any mode)")
    predict.add_argument("--model", help=model_help)
    predict.set_defaults(func=cmd_predict)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--model", help=model_help)
    serve.add_argument("--port", type=int, help="port (default: ports.serve; make serve SERVE_PORT=...)")
    serve.set_defaults(func=cmd_serve)
    errors = sub.add_parser("errors", help=cmd_errors.__doc__)
    errors.add_argument("--model", help=model_help)
    errors.add_argument("--out", type=Path, help="PNG to write (default: <evaluate.plots>/errors_production.png)")
    errors.set_defaults(func=cmd_errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    umbrella = build_parser()
    args, rest = umbrella.parse_known_args(argv)
    if args.command in STAGES:
        stage = importlib.import_module(f"finetune.stages.{args.command}")
        return stage.main(["--params", str(args.params), *rest])
    if rest:
        umbrella.error(f"unrecognized arguments: {' '.join(rest)}")
    return execute(args.func, args)
