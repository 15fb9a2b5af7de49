"""Run the shell blocks of the docs as a reader would type them (tests/test_docs.py).

The convention (also in docs/architecture.md, "Docs that run"):

* Every fenced block of ``README.md`` and ``docs/*.md`` whose info string is empty,
  ``sh``, ``bash``, ``shell`` or ``console`` is a **shell block**: commands a reader
  types. Blocks of other content carry their own info string (``yaml``, ``python``,
  ``text``). A command written in an indented (4-space) block is refused: fence it.
* The shell blocks of one file run in order, in one fresh working folder, each
  line as written (``\\`` continues a line, ``#`` starts a comment). ``fapm-merge``
  runs in-process through click's test runner; ``mergekit-yaml``,
  ``mergekit-multi``, ``python``, ``diff`` and ``cmp`` run as processes with this
  environment's tools. A command fails the test when it exits non-zero or prints
  a Python traceback (even with exit status 0: mergekit logs some and goes on).
* An HTML comment on the line just before a fence changes that block (it does not
  show in the rendered page): ``<!-- docs-test: DIRECTIVE; DIRECTIVE -->`` with
    - ``skip REASON``: not run; the reason is required (a real 8B model, a GPU,
      the network, the test suite itself, an hour-long benchmark) and runs to the
      end of the marker, so it comes last;
    - ``replace OLD NEW``: replace the text OLD by NEW in this block before it
      runs: paths the doc tells the reader to substitute (``/models/base``) or a
      test-sized value (``--items 16``); quote with ``"..."`` when there are
      spaces. NEW may use ``$DEMO`` (a ``fapm-merge demo`` folder built once per
      test session), ``$ADAPTER`` (a LoRA adapter on the demo base model) and
      ``$WORK`` (the file's working folder);
    - ``file NAME``: a non-shell block (a recipe) is written to NAME in the
      working folder, for the commands that follow;
    - ``run``: a ``python`` block is run too (python blocks are not run otherwise);
    - ``exit N``: the block's last command exits with status N, as the doc says it
      does (``fapm-merge tune`` exits 3 when no variant qualifies); any other
      status fails, and so does 0.

Everything is data read from the Markdown files: a new doc, or a rewritten one,
is collected without touching the tests.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from helpers import console_script

REPO = Path(__file__).resolve().parent.parent
SHELL_INFO = {"", "sh", "bash", "shell", "console"}
COMMAND_WORDS = ("fapm-merge", "mergekit-yaml", "mergekit-multi", "make", "python", "pip",
                 "huggingface-cli", "hf", ".venv/bin/", "/tmp/venv/bin/", "experiments/")
"""First words of a line that make an indented block a command a reader types."""
PROCESS_TOOLS = ("mergekit-yaml", "mergekit-multi", "diff", "cmp")
DIRECTIVES = ("skip", "replace", "file", "run", "exit")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s{0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[\w+-]*)\s*$")
TRACEBACK = "Traceback (most recent call last)"


def shown(path: Path) -> str:
    """A file's name in messages: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def doc_files() -> List[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


@dataclass
class Block:
    """One fenced block of a Markdown file.

    Attributes:
        path (`Path`): the Markdown file.
        line (`int`): line number of the opening fence (1-based).
        info (`str`): the fence's info string (``yaml``, ``sh``, ``""``...).
        text (`str`): the content, dedented by the fence's own indent.
        directives (`List[Tuple[str, List[str]]]`): from the marker comment.
    """

    path: Path
    line: int
    info: str
    text: str
    directives: List[Tuple[str, List[str]]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{shown(self.path)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.info in SHELL_INFO

    def directive(self, name: str) -> List[List[str]]:
        return [args for key, args in self.directives if key == name]

    @property
    def skipped(self) -> Optional[str]:
        reasons = self.directive("skip")
        return " ".join(reasons[0]) if reasons else None

    @property
    def runs(self) -> bool:
        if self.skipped is not None:
            return False
        return self.is_shell or (self.info == "python" and bool(self.directive("run")))


def parse_directives(body: str, where: str) -> List[Tuple[str, List[str]]]:
    """``"replace a b; file r.yml"`` -> ``[("replace", ["a", "b"]), ("file", ["r.yml"])]``."""
    parsed = []
    parts = [p.strip() for p in body.split(";")]
    for index, part in enumerate(parts):
        if not part:
            continue
        name, _, rest = part.partition(" ")
        if name == "skip":  # the reason is prose: it runs to the end of the marker
            rest = "; ".join([rest] + parts[index + 1:]).strip("; ")
            parts[index + 1:] = []
        if name not in DIRECTIVES:
            raise ValueError(f"{where}: unknown docs-test directive {name!r}; use one of {DIRECTIVES}")
        args = rest.split() if name == "skip" else shlex.split(rest)
        if name == "skip" and not args:
            raise ValueError(f"{where}: 'skip' needs a reason (what the block needs that a test "
                             "lacks: a real model, a GPU, the network, ...)")
        if name == "replace" and len(args) != 2:
            raise ValueError(f"{where}: 'replace' takes OLD NEW, got {args}")
        if name == "file" and len(args) != 1:
            raise ValueError(f"{where}: 'file' takes one NAME, got {args}")
        if name == "exit" and (len(args) != 1 or not args[0].isdigit()):
            raise ValueError(f"{where}: 'exit' takes one status number, got {args}")
        parsed.append((name, args))
    return parsed


def parse_markdown(path: Path) -> Tuple[List[Block], List[str]]:
    """The fenced blocks of a file and the convention's violations (orphan markers,
    commands in indented blocks, unclosed fences)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    errors: List[str] = []
    pending: Optional[Tuple[int, List[Tuple[str, List[str]]]]] = None
    index = 0
    relative = shown(path)
    previous_blank = True
    while index < len(lines):
        line = lines[index]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            if pending is not None:
                errors.append(f"{relative}:{pending[0]}: docs-test marker not followed by a fence")
            try:
                pending = (index + 1, parse_directives(marker.group("body"), f"{relative}:{index + 1}"))
            except ValueError as error:
                errors.append(str(error))
                pending = None
            index += 1
            continue
        if fence:
            indent, mark, info = fence.group("indent"), fence.group("fence"), fence.group("info")
            body: List[str] = []
            end = index + 1
            while end < len(lines) and lines[end].strip() != mark:
                text = lines[end]
                body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
                end += 1
            if end == len(lines):
                errors.append(f"{relative}:{index + 1}: fence never closed")
            blocks.append(Block(Path(path), index + 1, info, "\n".join(body) + "\n",
                                pending[1] if pending else []))
            pending = None
            index = end + 1
            previous_blank = False
            continue
        if pending is not None and line.strip():
            errors.append(f"{relative}:{pending[0]}: docs-test marker not followed by a fence")
            pending = None
        if line.startswith("    ") and previous_blank and line.strip().startswith(COMMAND_WORDS):
            errors.append(f"{relative}:{index + 1}: a command in an indented block "
                          f"({line.strip()[:40]!r}); put it in a fenced sh block so the docs "
                          "test runs it (or marks it with <!-- docs-test: skip REASON -->)")
        previous_blank = not line.strip() or (line.startswith("    ") and previous_blank)
        index += 1
    if pending is not None:
        errors.append(f"{relative}:{pending[0]}: docs-test marker not followed by a fence")
    return blocks, errors


def commands_of(text: str) -> List[str]:
    """The command lines of a shell block: continuations joined, comments and
    blank lines dropped (``# ...`` after a command is a comment too)."""
    joined: List[str] = []
    current = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if shlex.split(current, comments=True):
            joined.append(current.strip())
        current = ""
    return joined


class DocCommandFailed(AssertionError):
    """A documented command failed; the message names the file, line and command."""


@dataclass
class DocRunner:
    """Runs the blocks of one Markdown file in ``work``.

    Attributes:
        work (`Path`): the working folder (the reader's current directory).
        variables (`Callable[[str], str]`): value of ``$DEMO``/``$ADAPTER`` (built on demand).
        ran (`List[str]`): every command run, for the test's report.
        seconds (`List[float]`): wall time of each, in the same order.
    """

    work: Path
    variables: Callable[[str], str]
    ran: List[str] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    expected_exit: int = 0  # set per command by run_block from an `exit N` marker

    def expand(self, text: str) -> str:
        for name in re.findall(r"\$(DEMO|ADAPTER|WORK)\b", text):
            text = text.replace(f"${name}", str(self.work) if name == "WORK" else self.variables(name))
        return text

    def prepared(self, block: Block) -> str:
        text = block.text
        for old, new in block.directive("replace"):
            if old not in text:
                raise DocCommandFailed(f"{block.where}: 'replace {old} ...' matches nothing in the "
                                       "block: the doc changed; update its docs-test marker")
            text = text.replace(old, self.expand(new))
        return text

    def run_block(self, block: Block) -> None:
        text = self.prepared(block)
        for name in block.directive("file"):
            (self.work / name[0]).write_text(text, encoding="utf-8")
        if not block.runs:
            return
        if block.info == "python":
            script = self.work / f"_docs_block_{block.line}.py"
            script.write_text(text, encoding="utf-8")
            started = time.perf_counter()
            self._process(block, [sys.executable, str(script)], {}, f"python block at line {block.line}")
            self.ran.append(f"python block at line {block.line}")
            self.seconds.append(time.perf_counter() - started)
            return
        commands = commands_of(text)
        wanted = block.directive("exit")
        for index, command in enumerate(commands):
            # an `exit N` marker documents the status of the block's last command
            self.expected_exit = int(wanted[-1][0]) if wanted and index == len(commands) - 1 else 0
            self.run_command(block, command)
        self.expected_exit = 0

    def run_command(self, block: Block, command: str) -> None:
        words = shlex.split(command, comments=True)
        env: Dict[str, str] = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        program = words[0]
        started = time.perf_counter()
        if program == "fapm-merge":
            self._in_process(block, words[1:], env, command)
        elif program == "python":
            self._process(block, [sys.executable, *words[1:]], env, command)
        elif program in PROCESS_TOOLS:
            self._process(block, [console_script(program), *words[1:]], env, command)
        else:
            raise DocCommandFailed(
                f"{block.where}: the docs test cannot run {program!r} ({command!r}); mark the "
                "block <!-- docs-test: skip REASON --> if it needs something a test does not have")
        self.ran.append(command)
        self.seconds.append(time.perf_counter() - started)

    def _in_process(self, block: Block, args: List[str], env: Dict[str, str], command: str) -> None:
        from click.testing import CliRunner

        from fapm_merge.cli import main

        old = os.getcwd()
        os.chdir(self.work)
        try:
            result = CliRunner().invoke(main, args, env=env or None)
        finally:
            os.chdir(old)
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        if result.exit_code != self.expected_exit or crashed \
                or TRACEBACK in result.output:
            detail = result.output[-3000:]
            if crashed:
                import traceback

                detail += "".join(traceback.format_exception(*result.exc_info))[-3000:]
            raise DocCommandFailed(f"{block.where}: `{command}` exited {result.exit_code}:\n{detail}")

    def _process(self, block: Block, argv: List[str], env: Dict[str, str], command: str) -> None:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env,
                       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = subprocess.run(argv, cwd=self.work, capture_output=True, text=True,
                                env=environment, timeout=900)
        output = result.stdout + result.stderr
        if result.returncode != self.expected_exit or TRACEBACK in output:
            raise DocCommandFailed(f"{block.where}: `{command}` exited {result.returncode}"
                                   f"{' and printed a traceback' if TRACEBACK in output else ''}:\n"
                                   f"{output[-4000:]}")


def run_markdown(path: Path, work: Path, variables: Callable[[str], str]) -> DocRunner:
    """Run every runnable block of ``path`` in ``work``, in order; raise
    :class:`DocCommandFailed` at the first failure."""
    blocks, errors = parse_markdown(path)
    if errors:
        raise DocCommandFailed("; ".join(errors))
    runner = DocRunner(Path(work), variables)
    for block in blocks:
        runner.run_block(block)
    return runner


def needs(path: Path) -> set:
    """Which of ``$DEMO``/``$ADAPTER`` the file's markers use (built only when needed)."""
    text = Path(path).read_text(encoding="utf-8")
    return {name for name in ("DEMO", "ADAPTER") if f"${name}" in text}


__all__ = ["Block", "DocCommandFailed", "DocRunner", "commands_of", "doc_files", "needs",
           "parse_markdown", "run_markdown"]
