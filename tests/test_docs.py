"""The docs run as written (issue 17).

Every shell block of README.md and docs/*.md runs here, in order, in a fresh
working folder, on the demo pair or on models the tests build; a block that
cannot run in a test says why in the doc itself. The convention (markers,
``replace``, ``file``, what runs in-process and what as a process) is in
tests/docs_support.py and docs/architecture.md ("Docs that run"). A documented
command that breaks, exits non-zero or prints a traceback fails this test.

``make demo`` and ``make test`` are not run here (one builds a venv, the other is
this suite); their promise is checked against the Makefile instead.
"""

import re
import subprocess

import pytest

from docs_support import (
    REPO,
    DocCommandFailed,
    doc_files,
    needs,
    parse_markdown,
    run_markdown,
)

RUNNABLE = [path for path in doc_files()
            if any(block.runs for block in parse_markdown(path)[0])]


def test_every_shell_block_in_the_docs_is_run_or_marked():
    """Each shell block runs or carries a reason; markers parse; no command hides in
    an indented block, where the docs test would not see it."""
    errors, counted = [], {"run": 0, "skipped": 0}
    for path in doc_files():
        blocks, problems = parse_markdown(path)
        errors += problems
        for block in blocks:
            if block.is_shell:
                counted["run" if block.runs else "skipped"] += 1
            if block.directive("file") and block.is_shell:
                errors.append(f"{block.where}: 'file' is for recipe blocks, not shell blocks")
            if block.directive("run") and block.info != "python":
                errors.append(f"{block.where}: 'run' opts a python block in; shell blocks always run")
    assert not errors, "\n".join(errors)
    # the pages a new user follows word for word must keep running, not become "skip"
    followed = {"README.md", "docs/choosing-sparsity.md", "docs/lora.md", "docs/troubleshooting.md"}
    assert followed <= {str(p.relative_to(REPO)) for p in RUNNABLE}, counted


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(REPO)) for p in RUNNABLE])
def test_documented_commands_run(path, tmp_path, request):
    """The file's blocks, in order, as a reader would run them."""
    made = {}

    def variable(name):
        if name not in made:
            made[name] = str({"DEMO": lambda: request.getfixturevalue("demo_dir"),
                              "ADAPTER": lambda: request.getfixturevalue("demo_adapter")}[name]())
        return made[name]

    for name in needs(path):  # build shared inputs before the clock of the first command
        variable(name)
    runner = run_markdown(path, tmp_path, variable)
    assert runner.ran, f"{path}: nothing ran"
    for command, seconds in zip(runner.ran, runner.seconds):  # shown with pytest -rP
        print(f"{seconds:6.1f} s  {command}")


@pytest.mark.slow
def test_a_broken_documented_command_fails_the_docs_test(tmp_path):
    """The harness itself can fail: a wrong option, a missing file, an unmarked tool,
    a stale replace, a traceback on exit status 0."""
    cases = {
        "option": "```sh\nfapm-merge lint --no-such-option recipe.yml\n```\n",
        "missing": "```sh\nfapm-merge verify does-not-exist\n```\n",
        "tool": "```sh\ncurl https://example.org\n```\n",
        "replace": "<!-- docs-test: replace /models/base $WORK/base -->\n```sh\nfapm-merge --help\n```\n",
        "traceback": "```sh\npython -c \"import traceback, sys; traceback.print_stack(); "
                     "print('Traceback (most recent call last)', file=sys.stderr)\"\n```\n",
        "indented": "Run\n\n    fapm-merge verify OUT\n\nthen.\n",
    }
    for name, text in cases.items():
        page = tmp_path / f"{name}.md"
        page.write_text(text)
        with pytest.raises(DocCommandFailed):
            run_markdown(page, tmp_path, lambda n: str(tmp_path))
    page = tmp_path / "ok.md"
    page.write_text("<!-- docs-test: skip needs a GPU -->\n```sh\nmergekit-yaml r.yml o --cuda\n```\n"
                    "```sh\nfapm-merge --help   # prints the commands\n```\n")
    assert run_markdown(page, tmp_path, lambda n: "").ran == ["fapm-merge --help   # prints the commands"]


@pytest.mark.slow
def test_readme_names_the_folder_make_demo_writes():
    """Regression (issue 17, finding 7): the README did not say `make demo` writes to
    build/demo/ while the guide uses demo/."""
    dry = subprocess.run(["make", "-n", "demo", "VENV=.venv"], cwd=REPO, capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
    assert dry.returncode == 0, dry.stderr
    (command,) = [line for line in dry.stdout.splitlines() if "fapm-merge demo" in line]
    target = command.split("fapm-merge demo", 1)[1].split()[0]
    readme = (REPO / "README.md").read_text()
    make_line = next(line for line in readme.splitlines() if line.startswith("make demo"))
    assert f"{target}/" in make_line, (make_line, target)
    assert re.search(rf"`fapm-merge demo {re.escape(target)}`", readme)
