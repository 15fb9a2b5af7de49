"""The package's layers hold: one place per rule, no cycles, mergekit only where it merges.

Guards the restructuring of issue 14: the sparsity default and the complement rule
lived in six and three places and disagreed (tradeoff had a literal 0.9 and did not
know fapm_lora); methods.py, fapm_ties.py and lora_method.py imported each other.
"""

import ast
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

    hits = set()
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        grid = in_grid(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and type(node.value) is float \
                    and node.value in (0.9, 0.1) and id(node) not in grid:
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


def test_planning_variants_imports_neither_torch_nor_mergekit():
    # tune plans (and refuses a bad grid) before anything heavy loads.
    result = _python("""
        import sys
        import fapm_merge.workflows.variants
        print("torch" in sys.modules, "mergekit" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_importing_the_package_is_cheap():
    result = _python("""
        import sys
        import fapm_merge, fapm_merge.core.rules
        print("torch" in sys.modules, "mergekit" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
