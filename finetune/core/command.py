"""What every command shares: a ``--params`` option, logging, and errors as one paragraph.

Each DVC stage (``python -m finetune.stages.<name>``) and the umbrella ``python -m finetune``
run through :func:`execute`: errors the user can act on are printed as one paragraph (no
traceback) with exit code 1.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from finetune.core.config import PARAMS_FILE, Params, check_weights_file, load_params
from finetune.core.errors import FinetuneError

Handler = Callable[[Params, argparse.Namespace], "int | None"]


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the ``--params`` option every command has."""
    result = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    return result


def execute(handler: Handler, args: argparse.Namespace) -> int:
    """Load ``args.params`` and run ``handler``; the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # chatty at INFO
    try:
        status = handler(load_params(args.params), args)
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


def pause_collection(module: str) -> None:
    """Under ``python -m``: turn Python's cyclic garbage collector off while the command imports
    its libraries (:func:`stage_main` turns it on again). torch, torchvision, MLflow and SQLAlchemy
    leave about 800,000 objects that live as long as the process; on a 2-core CPU collecting
    among them while they were made took 0.9 s of a train stage's imports, and each full
    collection afterwards 0.25 s. A no-op when the module is imported rather than run."""
    if module == "__main__":
        gc.disable()


def resume_collection() -> None:
    """After :func:`pause_collection` and the imports: set every object made so far aside for
    good (``gc.freeze``: collections no longer walk them) and turn the collector on again. The
    few cycles left among them (9 MB for a train stage) are kept. A no-op when nothing paused
    the collector."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def check_params_first(module: str, stage: str) -> None:
    """Under ``python -m finetune.stages.<stage>``: read and check params.yaml (and, for ``train``,
    that the variant's local weights file exists) before the stage module imports torch and MLflow,
    which takes seconds, so a wrong setting fails in milliseconds, before the stage does any work
    and before DVC records anything; then pause the garbage collector for those imports (see
    :func:`pause_collection`). A no-op when the module is imported rather than run."""
    if module != "__main__":
        return
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--params", type=Path, default=PARAMS_FILE)
    args, rest = early.parse_known_args()
    try:
        params = load_params(args.params)
        variant = params.train.get(next((a for a in rest if not a.startswith("-")), ""))
        if stage in ("train", "search") and variant is not None and variant.init == "pretrained":
            check_weights_file(params.model.weights, args.params.parent, must_exist=True)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    pause_collection(module)


def stage_main(module: str, description: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
               handler: Handler, argv: Sequence[str] | None = None) -> int:
    """``python -m <module>``: parse ``argv`` with the stage's arguments, run ``handler`` (with the
    garbage collector on again, if the imports paused it)."""
    resume_collection()
    stage_parser = parser(f"python -m {module}", description)
    add_arguments(stage_parser)
    return execute(handler, stage_parser.parse_args(argv))


def exit_now(code: int | None) -> NoReturn:
    """End a command's process with ``code`` as Python would, less the teardown of every module.

    What the interpreter's own exit does first is done as it does it: threads are shut down
    (thread pools told to stop, then every thread that is not a daemon waited for), the atexit
    handlers run (logging is flushed, multiprocessing reaps loader workers, MLflow flushes), and
    output is flushed. Then the process ends without freeing each module's objects one by one,
    which took 2 s of every stage's run on a 2-core CPU once torch, torch._dynamo (torchvision
    imports it), MLflow and SQLAlchemy were loaded. A command's errors have been handled
    (printed, a code) by then."""
    # The interpreter's own first steps at exit (Py_FinalizeEx), in its order: _shutdown runs the
    # thread pools' exit hooks before it joins threads (joining a pool's idle worker first would
    # wait for ever).
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone (a reader that went away): nothing left to say
            pass
    os._exit(code or 0)
