"""What the flow asks DVC before it runs any task: the stages in order, and which are stale."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from dvc.repo import Repo


def stage_order(workspace: Path) -> list[str]:
    """The names of the workspace's dvc.yaml stages, upstream first; among stages free to run,
    the study's last (the candidate is registered before the long study starts) and then by name.

    DVC's graph has an edge from each stage to the stages it depends on, so its reverse has an
    edge from each stage to the stages that need it (.dvc files have no name: left out).
    """
    with Repo(str(workspace)) as repo:
        graph = repo.index.graph.reverse(copy=True)

        def key(stage) -> str:
            name = getattr(stage, "name", None) or ""
            return f"{int(name.startswith('study'))}{name}"

        stages = nx.lexicographical_topological_sort(graph, key=key)
        return [stage.name for stage in stages if getattr(stage, "name", None)]


def stale_stages(workspace: Path) -> set[str]:
    """The stages that `dvc status` finds changed (deps, params, outs, command, or never run)."""
    with Repo(str(workspace)) as repo:
        return {name.rpartition(":")[2] for name in repo.status()}
