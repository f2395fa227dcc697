"""The ``fetch`` stage: download ``data.url``, verify ``data.checksum``, extract safely into
``data.dir`` (atomically: a failed fetch leaves the previous dataset as it was).

`python -m finetune.stages.fetch`
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.ingest.fetch import fetch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage has no arguments of its own: params.yaml ``data:`` says everything."""


def run(params: Params, args: argparse.Namespace) -> None:
    """Download, verify and extract the dataset named by params.yaml ``data:``."""
    result = fetch(params.data)
    print(f"{result.dataset}: {result.files} files from {result.archive} (sha256:{result.sha256})")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.fetch", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
