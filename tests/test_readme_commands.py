"""The README and docs/ work as written from a fresh clone, once `make` has created .venv.

Every shell block (```bash, sh, shell, console) is read command by command: `make X` names a
target of the Makefile; `python -m mod` a module that exists, and `python -m finetune <tool>` a
tool of finetune/cli.py; a script or folder it names exists; `dvc`, `mlflow`, `prefect`,
`pytest`, `pip`, `torchrun` and `python` come from .venv, so the block must activate it first
(`source .venv/bin/activate`, from the project folder) or call `.venv/bin/<program>`. And no
link points outside the repository (a clone has nothing there) or at a file that is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

from finetune.cli import build_parser
from finetune.core.config import load_params

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV = REPO / ".venv"
# Programs a fresh machine has only in .venv (a system python lacks the project's packages).
FROM_VENV = {"dvc", "mlflow", "prefect", "pytest", "pip", "torchrun", "python", "python3"}
BUILTINS = {"cd", "source", ".", "export", "echo", "cat", "ls", "set", "umask"}
# Files the documented commands themselves make before a block sources them (not in a clone).
MADE = {".stack/env.sh": "make stack", ".env": "docs/team.md's printf line (compose's secrets)"}
_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_ANY_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def shell_blocks(text: str) -> list[list[str]]:
    """The command lines of each shell block (continuations joined; a console block's `$ ` lines)."""
    blocks = []
    for kind, body in _BLOCK.findall(text):
        lines = body.replace("\\\n", " ").splitlines()
        if kind == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        blocks.append([line for line in lines if line.strip()])
    return blocks


def commands(line: str) -> list[list[str]]:
    """The simple commands of one line: words split at &&, ||, ;, |, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS:
            found.append([])
        else:
            found[-1].append(token)
    return [words for words in found if words]


def make_targets() -> set[str]:
    """The Makefile's targets, as make itself reads them (`make -qp`: nothing runs)."""
    database = subprocess.run(["make", "-qp", "-f", "Makefile"], cwd=REPO, capture_output=True, text=True).stdout
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_][\w./-]*):(?!=)", database, re.MULTILINE)}


def finetune_tool(name: str) -> bool:
    """True when `python -m finetune <name>` is a command of finetune/cli.py."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:  # --help exits 0 for a known command (before its required arguments), 2 for an unknown one
            build_parser().parse_known_args([name, "--help"])
        except SystemExit as exit_:
            return exit_.code == 0
    return True


class Checker:
    """Reads one document's shell blocks and links and lists each problem in words."""

    def __init__(self, doc: Path, targets: set[str]) -> None:
        self.doc, self.targets, self.problems = doc, targets, []
        self.workspace = str(load_params(REPO / "params.yaml").demo.workspace)  # made by `make demo`

    def block(self, lines: list[str]) -> None:
        cwd, activated = REPO, False
        for line in lines:
            for words in commands(line):
                while words and re.fullmatch(r"\w+=.*", words[0]):  # VAR=value before a command
                    words = words[1:]
                if words:
                    cwd, activated = self.command(words, cwd, activated, line)

    def command(self, words: list[str], cwd: Path, activated: bool, line: str) -> tuple[Path, bool]:
        program, args = words[0], words[1:]
        where = f"{self.doc.relative_to(REPO)}: `{line.strip()}`"
        if program in ("source", ".") and args:
            if not (cwd / args[0]).is_file() and Path(args[0]).as_posix().removeprefix("./") not in MADE:
                self.problems.append(f"{where}: {args[0]} does not exist from {cwd.relative_to(REPO.parent)}")
            return cwd, activated or args[0].endswith(".venv/bin/activate")
        if program == "cd" and args:
            target = cwd / args[0]
            if not (target.is_dir() or target == REPO / self.workspace):
                self.problems.append(f"{where}: no folder {args[0]}")
            return target, activated
        if program == "make":
            self.make(where, args)
        elif program.startswith(".venv/bin/"):
            self.exists(where, cwd / program)
            self.program_args(where, Path(program).name, args, cwd)
        elif program in FROM_VENV:
            if not activated:
                self.problems.append(f"{where}: `{program}` needs the project's environment; put "
                                     "`source .venv/bin/activate` above it in the block, or use a make target")
            if not (VENV / "bin" / program).exists():
                self.problems.append(f"{where}: .venv/bin/{program} does not exist")
            self.program_args(where, program, args, cwd)
        elif program.startswith(("./", "/")) or program.endswith((".py", ".sh")):
            self.exists(where, cwd / program)
        elif program not in BUILTINS and shutil.which(program) is None:
            self.problems.append(f"{where}: no program `{program}` on PATH")
        return cwd, activated

    def make(self, where: str, args: list[str]) -> None:
        for goal in (a for a in args if not a.startswith("-") and "=" not in a):
            if goal not in self.targets:
                self.problems.append(f"{where}: the Makefile has no target `{goal}`")

    def program_args(self, where: str, program: str, args: list[str], cwd: Path) -> None:
        """`-m module` (python, torchrun) exists; `python -m finetune <tool>` too; `python x.py` exists."""
        runs_modules = program.startswith("python") or program == "torchrun"  # pytest -m is a marker
        if runs_modules and "-m" in args and args.index("-m") + 1 < len(args):
            module = args[args.index("-m") + 1]
            if importlib.util.find_spec(module) is None:
                self.problems.append(f"{where}: no module {module}")
            rest = args[args.index("-m") + 2:]
            if module == "finetune" and rest and not finetune_tool(rest[0]):
                self.problems.append(f"{where}: `python -m finetune` has no command {rest[0]!r}")
        elif program.startswith("python") and args and args[0].endswith(".py"):
            self.exists(where, cwd / args[0])

    def exists(self, where: str, path: Path) -> None:
        if not path.exists():
            self.problems.append(f"{where}: {path.relative_to(REPO)} does not exist")

    def links(self, text: str) -> None:
        for target in _LINK.findall(_ANY_BLOCK.sub("", text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address, mailto:, or an anchor in this page
            path = target.split("#")[0]
            where = f"{self.doc.relative_to(REPO)}: link {target}"
            resolved = (self.doc.parent / path).resolve()
            if path.startswith(("/", "~")) or not resolved.is_relative_to(REPO):
                self.problems.append(f"{where} points outside the repository (a clone has nothing there)")
            elif not resolved.exists():
                self.problems.append(f"{where}: no such file")


def check(doc: Path, text: str, targets: set[str]) -> list[str]:
    """Every problem of ``text`` (the content of ``doc``), in words."""
    checker = Checker(doc, targets)
    for lines in shell_blocks(text):
        checker.block(lines)
    checker.links(text)
    return checker.problems


@pytest.fixture(scope="module")
def targets() -> set[str]:
    found = make_targets()
    assert {"install", "run", "demo", "test", "status", "predict"} <= found
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(REPO).as_posix())
def test_every_command_and_link_works_as_written(doc, targets):
    problems = check(doc, doc.read_text(encoding="utf-8"), targets)
    assert not problems, "\n".join(problems)


def test_the_docs_have_shell_blocks_to_check():
    blocks = [block for doc in DOCS for block in shell_blocks(doc.read_text(encoding="utf-8"))]
    assert len(blocks) >= 8
    assert any("make status" in line for block in blocks for line in block)
    assert all((VENV / "bin" / program).exists() for program in ("dvc", "mlflow", "prefect"))


def test_the_check_finds_what_a_fresh_clone_would_trip_on(targets):
    """The failures of the issue this test was written for, each one caught."""
    page = REPO / "docs" / "page.md"
    text = """
```bash
cd demo && dvc status && dvc dag
python -m finetune predict photo.jpg
make nosuchtarget WORKSPACE=demo
```

```console
$ source .venv/bin/activate
$ python -m finetune nosuchtool
$ python -m no_such_module && python bench/nosuch.py
$ python -m finetune promote --force
output lines are not commands: dvc whatever
```

[design](../../shared/design.md) · [absolute](/etc/passwd) · [gone](stages-old.md) · [ok](stages.md) · [web](https://dvc.org)
"""
    problems = check(page, text, targets)
    expected = ["`dvc` needs the project's environment", "`python` needs the project's environment",
                "no target `nosuchtarget`", "no command 'nosuchtool'", "no module no_such_module",
                "bench/nosuch.py does not exist", "link ../../shared/design.md points outside",
                "link /etc/passwd points outside", "link stages-old.md: no such file"]
    for phrase in expected:
        assert sum(phrase in problem for problem in problems) >= 1, (phrase, problems)
    assert len(problems) == len(expected) + 1, problems  # dvc twice: status and dag
    assert not any("promote" in problem or "stages.md" in problem.split("link ")[-1][:10] for problem in problems)


@pytest.mark.parametrize(("target", "variable", "key"), [("ui", "UI_PORT", "ui"), ("serve", "SERVE_PORT", "serve"),
                                                       ("scheduler", "PREFECT_PORT", "prefect")])
def test_every_server_refuses_a_busy_port_in_one_line_before_starting(target, variable, key):
    import os
    import socket

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # make scheduler starts its own
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(["make", "-s", target, f"{variable}={port}"], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env=env)
    assert done.returncode != 0 and "http://" not in done.stdout  # no URL printed for a server that is not there
    problem = [line for line in done.stderr.splitlines() if "already in use" in line]
    assert len(problem) == 1, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use by another program: set {variable}" in problem[0]
    assert f"ports.{key} in params.yaml" in problem[0] and "Traceback" not in done.stderr
