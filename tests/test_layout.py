"""The package's layers hold: one place per rule, no cycles, mergekit only where it merges.

Guards the restructuring of issue 14: the sparsity default and the complement rule
lived in six and three places and disagreed (tradeoff had a literal 0.9 and did not
know fapm_lora); methods.py, fapm_ties.py and lora_method.py imported each other.
"""

import ast
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fapm_merge"
LAYERS = ("core", "io", "methods", "evaluation", "workflows", "cli")
"""Bottom to top: a module may import from its own layer and the ones before it."""


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path):
    """Every ``fapm_merge...`` module a file imports, at module level or in a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fapm_merge"):
            found.add(node.module)
            for alias in node.names:  # "from fapm_merge.io import checkpoint"
                found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fapm_merge"))
    return found


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_imports_from_a_higher_layer():
    modules = dict(_modules())
    wrong = []
    for module, path in modules.items():
        here = _layer(module)
        if here is None:
            continue
        for target in _imports(path):
            there = _layer(target)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up the layers: " + ", ".join(sorted(wrong))


def test_no_import_cycle_among_the_package_modules():
    modules = dict(_modules())
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    # A package's own __init__ importing its submodules is how packages work, not a cycle.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _definitions_of(pattern):
    """Modules whose code (not docstrings) assigns or computes ``pattern``."""
    hits = set()
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if pattern(node):
                hits.add(module)
    return hits


def test_the_default_sparsities_are_written_in_one_module():
    # A bare 0.9 or 0.1 is a default written again; inside a tuple or list it is one
    # value of a sweep grid (tune's), which is data, not a default.
    def in_grid(tree):
        return {id(element) for node in ast.walk(tree) if isinstance(node, (ast.Tuple, ast.List))
                for element in node.elts}

    # defaults of another quantity that happen to share the value, each named once
    other_defaults = {"MIN_REPAIR"}  # the repair rule's least share of the CF to take away

    def named_other(tree):
        return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id in other_defaults for t in node.targets)}

    hits = set()
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        skip = in_grid(tree) | named_other(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) is float \
                    and node.value in (0.9, 0.1) and id(node) not in skip:
                hits.add(module)
    assert hits == {"fapm_merge.core.rules"}


def test_the_exact_decimal_complement_is_written_in_one_module():
    def fraction_use(node):
        return isinstance(node, ast.Name) and node.id == "Fraction"

    assert _definitions_of(fraction_use) == {"fapm_merge.core.rules"}


def test_methods_are_registered_in_one_place():
    def register_call(node):
        return isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "register"

    assert _definitions_of(register_call) == {"fapm_merge.methods"}


def test_every_use_of_mergekit_private_api_is_in_compat():
    from fapm_merge.methods.compat import PRIVATE_API

    # Every name compat lists, underscored or not (ExecuteMergeMethodTask, SaveTensor).
    private = {attribute for _module, attribute, _fields in PRIVATE_API}

    def private_mergekit(node):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergekit"):
            return any(a.name.startswith("_") or a.name in private for a in node.names)
        return isinstance(node, ast.Attribute) and node.attr in private

    assert _definitions_of(private_mergekit) <= {"fapm_merge.methods.compat"}


def test_the_installed_mergekit_has_the_private_api_compat_relies_on():
    from fapm_merge.methods.compat import private_api_problems

    problems = private_api_problems()
    assert not problems, (
        "mergekit moved API that fapm_merge/methods/compat.py relies on: "
        + "; ".join(problems) + ". Mend compat.py for this mergekit release."
    )


def test_a_moved_private_name_is_reported_by_name(monkeypatch):
    from fapm_merge.methods import compat

    monkeypatch.setattr(compat, "PRIVATE_API", compat.PRIVATE_API + (
        ("mergekit.merge", "_renamed_in_a_later_release", ()),
        ("mergekit.io.tasks", "SaveTensor", ("a_field_that_moved",)),
        ("mergekit.not_a_module", "x", ()),
    ))
    problems = compat.private_api_problems()
    assert problems == [
        "mergekit.merge._renamed_in_a_later_release is gone",
        "mergekit.io.tasks.SaveTensor has no field 'a_field_that_moved'",
        "mergekit.not_a_module cannot be imported (No module named 'mergekit.not_a_module')",
    ]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("arguments", [["eval", "--help"], ["tradeoff", "--help"],
                                       ["analyze", "--help"], ["--help"]])
@pytest.mark.slow
def test_commands_that_do_not_merge_do_not_import_mergekit(arguments):
    result = _python(f"""
        import sys
        from click.testing import CliRunner
        from fapm_merge.cli import main
        outcome = CliRunner().invoke(main, {arguments!r})
        print(outcome.exit_code, "mergekit" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"]


@pytest.mark.slow
def test_analyze_and_tradeoff_run_without_importing_mergekit(llama_pair, tmp_path):
    base, finetuned = llama_pair
    results = tmp_path / "results.jsonl"
    import json

    recipe = {"merge_method": "fapm", "base_model": str(base),
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.5}}]}
    lines = [
        {"model": str(base), "metrics": {"text": {"loss": 2.0}, "task": {"accuracy": 0.1}}},
        {"model": str(finetuned), "metrics": {"text": {"loss": 2.2}, "task": {"accuracy": 0.9}}},
        {"model": "/s/fapm-s0.5", "recipe": recipe,
         "metrics": {"text": {"loss": 2.1}, "task": {"accuracy": 0.8}}},
    ]
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = _python(f"""
        import sys
        from click.testing import CliRunner
        from fapm_merge.cli import main
        runner = CliRunner()
        a = runner.invoke(main, ["analyze", {str(base)!r}, {str(finetuned)!r}, "--json-only"])
        t = runner.invoke(main, ["tradeoff", {str(results)!r}, "--rule", "weighted", "--plot", {str(tmp_path / 'p.png')!r}])
        print(a.exit_code, t.exit_code, "mergekit" in sys.modules)
        print(a.output[-300:] if a.exit_code else "", t.output[-300:] if t.exit_code else "")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["0", "0", "False"], result.stdout


@pytest.mark.parametrize("modules", [
    "fapm_merge.workflows.variants",  # tune plans (and refuses a bad grid) before anything heavy loads
    "fapm_merge.workflows.tradeoff.screen",  # screening decides from records alone
    "fapm_merge, fapm_merge.core.rules",  # importing the package is cheap
])
@pytest.mark.slow
def test_light_modules_import_neither_torch_nor_mergekit(modules):
    result = _python(f"""
        import sys
        import {modules}
        print("torch" in sys.modules, "mergekit" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def _constants():
    """Every module-level UPPER_CASE constant of the package given as a literal:
    ``{name: value}`` (a name defined twice keeps both values, as a set)."""
    found = {}
    for _module, path in _modules():
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.lstrip("_").isupper() \
                        and isinstance(node.value, ast.Constant):
                    found.setdefault(target.id, set()).add(node.value.value)
    return found


def _literal_text(node) -> str:
    """A string argument's literal parts; what an f-string computes is left out."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "{}".join(_literal_text(part) for part in node.values if not isinstance(part, ast.FormattedValue))
    return ""


_DEFAULT_CLAUSE = re.compile(r"\bdefault\b:?([^()]*)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def _restated_defaults(source: str):
    """Help and description texts that write a number equal to a numeric constant
    after the word "default": the default restated by hand, not taken from it."""
    numbers = {value for values in _constants().values() for value in values
               if type(value) in (int, float)}
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg not in ("help", "description"):
                continue
            for clause in _DEFAULT_CLAUSE.findall(_literal_text(keyword.value)):
                found += [f"line {node.lineno}: {number!r} in 'default{clause}'"
                          for number in _NUMBER.findall(clause) if float(number) in numbers]
    return found


def test_no_help_text_restates_a_default_by_hand():
    # "(default 0.9; ...)" written in a help string silently disagrees once the
    # constant changes; show_default or an f-string of the constant cannot.
    restated = {module: _restated_defaults(path.read_text()) for module, path in _modules()}
    assert not {module: hits for module, hits in restated.items() if hits}


def test_the_restated_default_check_catches_a_literal():
    source = textwrap.dedent("""
        import click
        DEFAULT_SPARSITY = 0.9
        a = click.option("--sparsity", type=float, help="Share reset (default 0.9; 0.1 with --adapter).")
        b = click.option("--sparsity", type=float, help=f"Share reset (default {DEFAULT_SPARSITY}).")
        c = click.option("--values", help="e.g. 0.5,0.7,0.9")
    """)
    assert [hit.split(":")[0] for hit in _restated_defaults(source)] == ["line 4", "line 4"]


_DOC_DEFAULT = re.compile(r"(\w+) \(`[^`]*`, defaults to ([^)]*?)\)")


def _signature_defaults(node):
    """A function's parameters, or a dataclass's fields, that have a default: name -> node."""
    if isinstance(node, ast.ClassDef):
        fields = {s.target.id: s.value for s in node.body
                  if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}
        return {name: value for name, value in fields.items() if not isinstance(value, ast.Call)}
    positional = node.args.posonlyargs + node.args.args
    found = dict(zip([a.arg for a in positional][len(positional) - len(node.args.defaults):], node.args.defaults))
    found.update({a.arg: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None})
    return found


def _docstring_defaults_that_disagree(source: str, constants):
    """``name (`type`, defaults to X)`` in a docstring where the code's default is
    another value: X a literal or a backquoted constant name, the code's default a
    literal or a package constant."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        defaults = _signature_defaults(node)
        for name, written in _DOC_DEFAULT.findall(ast.get_docstring(node) or ""):
            code = defaults.get(name)
            name_in_code = getattr(code, "id", getattr(code, "attr", None))
            values = {code.value} if isinstance(code, ast.Constant) else constants.get(name_in_code)
            quoted = re.fullmatch(r"`(\w+)`", written.strip())
            if quoted:
                if code is not None and quoted.group(1) != name_in_code:
                    found.append(f"{node.name}: {name} defaults to {written}, the code to {ast.unparse(code)}")
                continue
            try:
                said = ast.literal_eval(written.strip())
            except (ValueError, SyntaxError):
                continue  # prose ("the densities of the sweep"): nothing to compare
            if values and not any(said == v and type(said) is type(v) for v in values):
                found.append(f"{node.name}: {name} defaults to {written}, the code to {ast.unparse(code)}")
    return found


def test_docstring_defaults_agree_with_the_code():
    # the PEFT-style "beta (`float`, defaults to 1.0)" restates a default: it must
    # say what the signature (or the constant it names) says
    constants = _constants()
    wrong = {module: _docstring_defaults_that_disagree(path.read_text(), constants)
             for module, path in _modules()}
    assert not {module: hits for module, hits in wrong.items() if hits}


def test_the_docstring_default_check_catches_a_disagreement():
    source = textwrap.dedent('''
        def f(beta=DEFAULT_BETA, window=256, name="cpu", k=DEFAULT_BETA):
            """Args:
                beta (`float`, defaults to 0.5): wrong.
                window (`int`, defaults to 256): right.
                name (`str`, defaults to "cpu"): right.
                k (`float`, defaults to `DEFAULT_SPARSITY`): wrong name.
            """
    ''')
    assert [hit.split(" defaults")[0] for hit in
            _docstring_defaults_that_disagree(source, {"DEFAULT_BETA": {1.0}})] == ["f: beta", "f: k"]
