"""`python -m finetune <command>`: the thin commands that dvc.yaml, the Makefile and users run.

Each command reads params.yaml, calls one library function and prints its result; errors the
user can act on are printed as one paragraph (no traceback) with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
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
    from finetune.train_stage import Paths, train_variant

    if args.variant not in params.train:
        raise ConfigError(f"no variant {args.variant!r} under train: in params.yaml; have {sorted(params.train)}")
    result = train_variant(params, args.variant, Paths(args.out, args.metrics, args.plots))
    print(f"{result.variant}: test accuracy {result.test_acc:.4f} -> {result.model_path} "
          f"(MLflow run {result.run_id})")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # chatty at INFO
    args = build_parser().parse_args(argv)
    func: Callable[[Params, argparse.Namespace], None] = args.func
    try:
        func(load_params(args.params), args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
