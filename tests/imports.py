"""The project's imports, read from its source (ast), not by running it: which module file a
name is, which names a file imports (at any depth, inside functions too), and what a module can
reach. Used by the lineage and layout tests."""

from __future__ import annotations

import ast
from pathlib import Path


def module_file(name: str, root: Path) -> Path | None:
    """The project file of module ``name`` under ``root`` (None: not the project's)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement of ``path`` can load (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            base = ".".join(filter(None, [base, node.module]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules, if they are
    return names


def import_closure(module: str, root: Path) -> set[Path]:
    """The project files that ``python -m module`` can execute, found statically (``-m`` of a
    package runs its ``__main__``)."""
    todo, seen, files = [module, f"{module}.__main__"], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue
        files.add(path.relative_to(root))
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        todo += imported_names(path, name)
    return files


def project_modules(root: Path, packages: tuple[str, ...] = ("finetune", "flows", "tasks")) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules
