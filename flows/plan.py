"""What the flow asks DVC before it runs any task: the stages in order, and which are stale."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from dvc.repo import Repo


def stage_order(workspace: Path) -> list[str]:
    """The names of the workspace's dvc.yaml stages, upstream first.

    DVC's graph has an edge from each stage to the stages it depends on, so the reverse of a
    topological order runs every stage after its inputs (.dvc files have no name: left out).
    """
    with Repo(str(workspace)) as repo:
        stages = reversed(list(nx.topological_sort(repo.index.graph)))
        return [stage.name for stage in stages if getattr(stage, "name", None)]


def stale_stages(workspace: Path) -> set[str]:
    """The stages that `dvc status` finds changed (deps, params, outs, command, or never run)."""
    with Repo(str(workspace)) as repo:
        return {name.rpartition(":")[2] for name in repo.status()}
