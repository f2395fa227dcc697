"""The pipeline's stages as a short list for a terminal (`make dag`): each stage in an order
`dvc repro` may run them, with the stages it waits for.

`dvc dag` draws the graph as ASCII art some 200 characters wide, and `dvc dag --mermaid` numbers
its nodes; this reads the same graph from `dvc dag --dot` and names, for each stage, only the
stages it runs right after (a stage that an earlier one already waits for is left out, so
`evaluate` lists the train stages, not fetch and validate as well):

    stage            runs after
    fetch            -
    validate         fetch
    ...

`python -m finetune.dag [TARGET]` in a DVC repository (TARGET: a stage; then only what it needs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence

_NODE = re.compile(r'^"(?P<node>[^"]+)";$')
_EDGE = re.compile(r'^"(?P<source>[^"]+)"\s*->\s*"(?P<target>[^"]+)";$')
WIDTH = 100  # the longest line printed; longer lists of stages wrap


def parse_dot(dot: str) -> tuple[list[str], dict[str, set[str]]]:
    """The stages of `dvc dag --dot` output in its order, and each stage's direct upstream stages."""
    stages: list[str] = []
    upstream: dict[str, set[str]] = {}
    for line in dot.splitlines():
        if node := _NODE.match(line.strip()):
            stages.append(node["node"])
            upstream.setdefault(node["node"], set())
        elif edge := _EDGE.match(line.strip()):
            upstream.setdefault(edge["target"], set()).add(edge["source"])
            upstream.setdefault(edge["source"], set())
    stages += [name for name in upstream if name not in stages]
    return stages, upstream


def run_order(stages: list[str], upstream: dict[str, set[str]]) -> list[str]:
    """Every stage after all its upstream stages; among those ready, the one listed first."""
    done: list[str] = []
    waiting = list(stages)
    while waiting:
        ready = next((s for s in waiting if upstream[s] <= set(done)), None)
        if ready is None:
            raise ValueError(f"the stages {waiting} wait for each other (a cycle)")
        done.append(ready)
        waiting.remove(ready)
    return done


def ancestors(stage: str, upstream: dict[str, set[str]]) -> set[str]:
    """Every stage ``stage`` waits for, directly or through others."""
    seen: set[str] = set()
    todo = list(upstream[stage])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(upstream[name])
    return seen


def runs_after(stage: str, upstream: dict[str, set[str]]) -> set[str]:
    """The upstream stages of ``stage`` that no other upstream stage of it already waits for."""
    direct = upstream[stage]
    implied = set().union(*(ancestors(name, upstream) for name in direct))
    return direct - implied


def render(dot: str, width: int = WIDTH) -> str:
    """The table `make dag` prints from `dvc dag --dot` output: a stage a line, lines ≤ ``width``."""
    stages, upstream = parse_dot(dot)
    order = run_order(stages, upstream)
    column = max([len("stage"), *map(len, order)]) + 2
    lines = ["stage".ljust(column) + "runs after"]
    for stage in order:
        after = ", ".join(sorted(runs_after(stage, upstream), key=order.index)) or "-"
        lines += textwrap.wrap(after, width, initial_indent=stage.ljust(column), subsequent_indent=" " * column,
                               break_on_hyphens=False)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table for the DVC repository in the current folder; DVC's own error if it fails."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    done = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr or done.stdout)
        return done.returncode
    print(render(done.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
