"""`python -m finetune <command>`: the thin commands that dvc.yaml, the Makefile and users run.

Each command reads params.yaml, calls one library function and prints its result; errors the
user can act on are printed as one paragraph (no traceback) with exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from finetune.config import PARAMS_FILE, Params, load_params
from finetune.errors import ConfigError, FinetuneError

log = logging.getLogger("finetune")


def cmd_fetch(params: Params, args: argparse.Namespace) -> None:
    """Download, verify and extract the dataset named by params.yaml ``data:``."""
    from finetune.data.fetch import fetch

    result = fetch(params.data)
    print(f"{result.dataset}: {result.files} files from {result.archive} (sha256:{result.sha256})")


def cmd_validate(params: Params, args: argparse.Namespace) -> None:
    """Index data.dir and check it with the Great Expectations suite (settings ``validate:``)."""
    from finetune.validate import ValidationFailed, failure_message, validate_dataset

    cfg = params.validate_
    verdict = validate_dataset(cfg, params.data.dir)
    report = verdict.report
    for check in verdict.checks:
        if not check.success and check.severity != "critical":
            log.warning("warning only: %s — %s: %s", check.check, check.description, check.offending[:5])
    if not verdict.passed:
        raise ValidationFailed(failure_message(verdict, cfg))
    print(f"validation passed: {report['used']} of {report['files']} files "
          f"({report['quarantined']} quarantined) -> {cfg.files}; report {cfg.report}; "
          f"Data Docs {verdict.docs}")


def cmd_pretrain(params: Params, args: argparse.Namespace) -> None:
    """Train the source model on pretrain.data (a no-op note when it is null)."""
    from finetune.pretrain import pretrain

    path = pretrain(params, args.out)
    print(f"source model: {path}" if path else f"no pretraining (pretrain.data is null): {args.out}")


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    """Train one variant of train: (e.g. finetune, scratch) on the validated files."""
    import subprocess

    from finetune import distributed
    from finetune.train_stage import Paths, train_variant

    if args.variant not in params.train:
        raise ConfigError(f"no variant {args.variant!r} under train: in params.yaml; have {sorted(params.train)}")
    nproc = params.train[args.variant].nproc_per_node
    if nproc > 1 and not distributed.launched():
        # The same command again, in nproc processes under torchrun (this process only waits).
        command = distributed.torchrun_command(nproc, [
            "finetune", "--params", str(args.params), "train", args.variant, "--out", str(args.out),
            "--metrics", str(args.metrics), "--plots", str(args.plots)])
        print(f"train {args.variant}: DistributedDataParallel over {nproc} processes: {' '.join(command)}", flush=True)
        raise SystemExit(subprocess.call(command))
    result = train_variant(params, args.variant, Paths(args.out, args.metrics, args.plots))
    if not result.run_id:  # a torchrun process other than rank 0: rank 0 reports
        return
    print(f"{result.variant}: test accuracy {result.test_acc:.4f} -> {result.model_path} "
          f"(MLflow run {result.run_id})")


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    """Score every variant on the test split; compare challenger and baseline (settings ``evaluate:``)."""
    from finetune.evaluate_stage import EvalPaths, run_evaluate

    results, comparison = run_evaluate(params, EvalPaths(args.models, args.history))
    for r in results:
        print(f"{r.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()))
    test = comparison["mcnemar"]
    print(f"{comparison['challenger']} - {comparison['baseline']}: accuracy {comparison['delta']['accuracy']:+.4f}, "
          f"McNemar p = {test['p_value']:.4g} ({test['challenger_only']} vs {test['baseline_only']} discordant); "
          f"report {params.evaluate.report}")


def cmd_register(params: Params, args: argparse.Namespace) -> None:
    """Register the variant that wins on register.metric as a new version, alias ``candidate``."""
    from finetune.registry import register_candidate

    r = register_candidate(params, args.models)
    how = "already registered as" if r.reused else "registered as"
    print(f"{r.variant} ({r.metric} {r.value:.4f}, run {r.run_id}) {how} {r.model_name} version {r.version} "
          f"@candidate")


def cmd_promote(params: Params, args: argparse.Namespace) -> None:
    """Move ``production`` to the candidate only if it beats production by register.min_improvement."""
    from finetune.registry import promote

    d = promote(params, version=args.version, force=args.force)
    print(f"{d.action}: {d.model_name} production {_v(d.production_before)} -> {_v(d.production_after)}; {d.reason}")
    if args.json:  # for the flow's gate task: the recorded decision, without reading the log back
        print(json.dumps(dataclasses.asdict(d)), flush=True)


def cmd_rollback(params: Params, args: argparse.Namespace) -> None:
    """Move ``production`` back to the previous production version."""
    from finetune.registry import rollback

    d = rollback(params)
    print(f"{d.action}: {d.model_name} production {_v(d.production_before)} -> {_v(d.production_after)}")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "(none)"


def _model_uri(params: Params, args: argparse.Namespace) -> str:
    return args.model or f"models:/{params.register_.model_name}@production"


def cmd_predict(params: Params, args: argparse.Namespace) -> int:
    """Classify image files with a registered model (default: production), as the server would."""
    import json

    from finetune.serving import load_served, predict_files

    results = predict_files(load_served(_model_uri(params, args)), args.images)
    for result in results:
        print(json.dumps(result))
    return 1 if any("error" in r for r in results) else 0


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    """Serve a registered model (default: production) over REST with `mlflow models serve`."""
    from finetune.serving import serve

    serve(_model_uri(params, args), params.serve.host, args.port or params.serve.port)


def cmd_errors(params: Params, args: argparse.Namespace) -> None:
    """Draw the test images a registered model (default: production) gets wrong."""
    from finetune.evaluate_stage import errors_of_model

    out, wrong, total = errors_of_model(params, _model_uri(params, args), args.out)
    print(f"{wrong} of {total} test images misclassified -> {out}")


def cmd_sample(params: Params, args: argparse.Namespace) -> None:
    """Write a generated archive of the hotdog.zip layout (settings from ``demo:``)."""
    from finetune.sample import class_names, write_sample_archive

    demo = params.demo
    num_classes = args.classes or demo.num_classes
    summary = write_sample_archive(
        args.out,
        classes=class_names(num_classes),
        train_per_class=args.train or demo.train_per_class,
        test_per_class=args.test or demo.test_per_class,
        seed=demo.seed if args.seed is None else args.seed,
        root=args.root or ("hotdog" if num_classes == 2 else "chairs"),
        min_side=demo.min_side,
        max_side=demo.max_side,
    )
    print(f"{summary.path}: sha256:{summary.sha256} {summary.counts}")


def cmd_demo_setup(params: Params, args: argparse.Namespace) -> None:
    """Create or refresh the offline demo's workspace and its generated dataset."""
    from finetune.demo import setup_demo

    workspace = setup_demo(params, Path.cwd())
    print(f"demo workspace ready: {workspace} (its params.yaml points data.url at the generated archive)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage or tool."""
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=cmd_fetch.__doc__).set_defaults(func=cmd_fetch)
    sample = sub.add_parser("sample", help=cmd_sample.__doc__)
    sample.add_argument("--out", type=Path, required=True, help="zip file to write")
    sample.add_argument("--classes", type=int, help="number of classes (default: demo.num_classes)")
    sample.add_argument("--train", type=int, help="train images per class (default: demo.train_per_class)")
    sample.add_argument("--test", type=int, help="test images per class (default: demo.test_per_class)")
    sample.add_argument("--seed", type=int, help="random seed (default: demo.seed)")
    sample.add_argument("--root", help="top folder in the archive (default: hotdog, or chairs)")
    sample.set_defaults(func=cmd_sample)
    sub.add_parser("validate", help=cmd_validate.__doc__).set_defaults(func=cmd_validate)
    pre = sub.add_parser("pretrain", help=cmd_pretrain.__doc__)
    pre.add_argument("--out", type=Path, required=True, help="folder for the source model")
    pre.set_defaults(func=cmd_pretrain)
    train = sub.add_parser("train", help=cmd_train.__doc__)
    train.add_argument("variant", help="a key under train: in params.yaml")
    train.add_argument("--out", type=Path, required=True, help="folder for model.pt and checkpoints")
    train.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    train.add_argument("--plots", type=Path, required=True, help="per-epoch CSV to write")
    train.set_defaults(func=cmd_train)
    sub.add_parser("demo-setup", help=cmd_demo_setup.__doc__).set_defaults(func=cmd_demo_setup)
    _registry_commands(sub)
    return parser


def _registry_commands(sub) -> None:
    """evaluate, register, promote, rollback, predict, serve, errors."""
    evaluate = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    evaluate.add_argument("--models", type=Path, required=True, help="folder of <variant>/model.pt")
    evaluate.add_argument("--history", type=Path, required=True, help="folder of <variant>.csv (per-epoch stats)")
    evaluate.set_defaults(func=cmd_evaluate)
    register = sub.add_parser("register", help=cmd_register.__doc__)
    register.add_argument("--models", type=Path, required=True, help="folder of <variant>/model.pt")
    register.set_defaults(func=cmd_register)
    promote = sub.add_parser("promote", help=cmd_promote.__doc__)
    promote.add_argument("--version", help="promote this version instead of @candidate")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded)")
    promote.add_argument("--json", action="store_true", help="also print the decision as one JSON line")
    promote.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help=cmd_rollback.__doc__).set_defaults(func=cmd_rollback)
    model_help = "MLflow model URI (default: models:/<register.model_name>@production)"
    predict = sub.add_parser("predict", help=cmd_predict.__doc__)
    predict.add_argument("images", type=Path, nargs="+", help="image files (any size, any mode)")
    predict.add_argument("--model", help=model_help)
    predict.set_defaults(func=cmd_predict)
    serve = sub.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--model", help=model_help)
    serve.add_argument("--port", type=int, help="port (default: serve.port)")
    serve.set_defaults(func=cmd_serve)
    errors = sub.add_parser("errors", help=cmd_errors.__doc__)
    errors.add_argument("--model", help=model_help)
    errors.add_argument("--out", type=Path, help="PNG to write (default: <evaluate.plots>/errors_production.png)")
    errors.set_defaults(func=cmd_errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # chatty at INFO
    args = build_parser().parse_args(argv)
    func: Callable[[Params, argparse.Namespace], int | None] = args.func
    try:
        status = func(load_params(args.params), args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # The tracking server unreachable or refusing: say so plainly (MLflow's own message).
        if not type(err).__module__.startswith("mlflow"):
            raise
        print(f"error: MLflow ({os.environ.get('MLFLOW_TRACKING_URI') or 'the local store'}): {err}", file=sys.stderr)
        return 1
    return status or 0
