"""The interpreter start-up hook (_fapm_merge_startup, run by fapm_merge.pth) is harmless.

It runs in every Python process of the environment, so each test starts a fresh
interpreter of the real venv and looks at what the hook did there. Issue 8, item 4.

Run ``python tests/test_startup_hook.py --measure`` to measure what the hook adds
to ``python -c pass`` (the figure in docs/reliability.md); it is measured, never
asserted, because timings depend on the machine.
"""

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

SITE = Path(sysconfig.get_paths()["purelib"])
HOOK_FILE = SITE / "_fapm_merge_startup.py"
REPO = Path(__file__).resolve().parents[1]


def python(code: str, *args: str, env_extra: dict = None, cwd=None):
    """Run ``code`` in a fresh interpreter of this venv (site and .pth files active)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONWARNINGS")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd=cwd or "/", timeout=300,
    )


def test_hook_file_is_installed_and_current():
    # The editable install copies the hook into site-packages; a stale copy would
    # make every other test here check old code.
    assert (SITE / "fapm_merge.pth").read_text().strip() == (
        "import _fapm_merge_startup; _fapm_merge_startup.install()"
    )
    assert HOOK_FILE.read_bytes() == (REPO / "_fapm_merge_startup.py").read_bytes(), (
        "site-packages holds a stale hook: pip install --no-deps -e ."
    )


@pytest.mark.slow
def test_startup_imports_neither_torch_nor_mergekit():
    result = python("""
        import json, sys
        print(json.dumps({
            "heavy": sorted(m for m in sys.modules
                            if m.split(".")[0] in ("torch", "mergekit", "fapm_merge",
                                                   "transformers", "pydantic", "numpy")),
            "hook": "_fapm_merge_startup" in sys.modules,
            "finders": [type(f).__name__ for f in sys.meta_path],
        }))
    """)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["hook"], "the .pth line did not run: the test would prove nothing"
    assert state["finders"].count("_MergekitMethodsFinder") == 1
    assert state["heavy"] == []
    assert result.stderr == ""


@pytest.mark.slow
def test_startup_does_no_file_or_network_io():
    # -S: no site, so the audit hook is in place before the hook module runs.
    result = python(f"""
        import sys
        sys.path.append({str(SITE)!r})
        import _fapm_merge_startup as hook
        events = []
        watched = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove",
                   "os.rename", "socket.", "urllib.", "http.", "subprocess.")
        sys.addaudithook(lambda event, args: events.append(event)
                         if event.startswith(watched) else None)
        hook.install()
        hook.install()
        # every later import in the program passes through the finder first
        assert sys.meta_path[0].find_spec("json") is None
        assert sys.meta_path[0].find_spec("mergekit") is None
        print(events)
    """, "-S")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_unrelated_program_runs_when_mergekit_is_broken(tmp_path):
    fake = tmp_path / "mergekit"
    (fake / "merge_methods").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "merge_methods" / "__init__.py").write_text("raise ImportError('broken mergekit')\n")
    unrelated = python("import json; print(json.dumps([1, 2]))",
                       env_extra={"PYTHONPATH": str(tmp_path)})
    assert (unrelated.returncode, unrelated.stdout, unrelated.stderr) == (0, "[1, 2]\n", "")
    # A program that imports the broken mergekit sees mergekit's own error, not ours.
    importer = python("""
        try:
            import mergekit.merge_methods
        except ImportError as error:
            print("caught", error)
    """, env_extra={"PYTHONPATH": str(tmp_path)})
    assert importer.returncode == 0, importer.stderr
    assert importer.stdout == "caught broken mergekit\n"
    assert "fapm" not in importer.stderr


@pytest.mark.slow
def test_unrelated_program_runs_when_mergekit_is_missing():
    # sys.modules[name] = None is how Python spells "not installed" for one process.
    result = python("""
        import sys
        sys.modules["mergekit"] = None
        try:
            import mergekit.merge_methods
        except ModuleNotFoundError as error:
            print("missing:", error.name)
        print("still running")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "missing: mergekit.merge_methods\nstill running\n"
    assert result.stderr == ""


@pytest.mark.slow
def test_broken_plugin_becomes_one_warning(tmp_path):
    # A fapm_merge whose methods module raises, shadowing the real one.
    package = tmp_path / "fapm_merge"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "methods.py").write_text("raise RuntimeError('plugin exploded')\n")
    result = python("""
        import mergekit.merge_methods as mm
        import mergekit.merge_methods.registry  # a second import: no second warning
        names = [m.spec.name for m in mm.registry.registered_methods()]
        print("fapm" in names, "linear" in names)
    """, env_extra={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False True\n"
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert "plugin exploded" in warnings[0] and "fapm-merge could not register" in warnings[0]


@pytest.mark.slow
def test_plain_import_of_mergekit_registers_fapm():
    result = python("""
        import sys
        import mergekit.merge_methods as mm
        print([m.spec.name for m in mm.registry.registered_methods()].count("fapm"))
        print("torch" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]


@pytest.mark.slow
def test_install_after_mergekit_was_imported_registers_at_once():
    # The finder is removed first, as if the .pth had not run (python -S, or an
    # environment where the hook was installed after start-up).
    result = python("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if type(f).__name__ != "_MergekitMethodsFinder"]
        import mergekit.merge_methods as mm
        names = lambda: [m.spec.name for m in mm.registry.registered_methods()]
        before = names().count("fapm")
        import _fapm_merge_startup
        _fapm_merge_startup.install()
        _fapm_merge_startup.install()
        print(before, names().count("fapm"),
              [type(f).__name__ for f in sys.meta_path].count("_MergekitMethodsFinder"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "1"]


@pytest.mark.slow
def test_import_fapm_merge_registers_idempotently():
    result = python("""
        import fapm_merge, fapm_merge.methods
        from mergekit.merge_methods import registry
        fapm_merge.register_methods(); fapm_merge.register_methods()
        import importlib, _fapm_merge_startup
        _fapm_merge_startup.install(); _fapm_merge_startup._register_quietly()
        names = [m.spec.name for m in registry.registered_methods()]
        print(names.count("fapm"), len(names) == len(set(names)))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "True"]
    assert result.stderr == ""


# ----------------------------------------------------------------- measurement only


def measure(runs: int = 200) -> dict:
    """Median wall time of ``python -c pass`` with and without the hook.

    Two fresh, otherwise identical venvs of the same interpreter; one gets the
    hook file and the .pth line copied in. Runs are interleaved so machine load
    hits both alike. Never touches the shared venv. Also returns the hook's own
    line of ``python -X importtime``.
    """
    import tempfile
    import venv

    root = Path(tempfile.mkdtemp(prefix="hook-measure-"))
    bare, hooked = root / "bare", root / "hooked"
    for target in (bare, hooked):
        venv.EnvBuilder(with_pip=False).create(target)
    hooked_site = next(hooked.glob("lib/python*/site-packages"))
    for name in ("_fapm_merge_startup.py", "fapm_merge.pth"):
        (hooked_site / name).write_bytes((SITE / name).read_bytes())
    # pip byte-compiles what it installs; without the .pyc (and with
    # PYTHONDONTWRITEBYTECODE=1) every start would recompile the hook instead.
    import py_compile

    py_compile.compile(str(hooked_site / "_fapm_merge_startup.py"), doraise=True)
    import resource

    def child_cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    times = {"bare": [], "hooked": []}
    cpu = {"bare": [], "hooked": []}  # CPU time suffers less from other load
    for _ in range(runs):  # interleaved, so drift hits both equally
        for key, env_dir in (("bare", bare), ("hooked", hooked)):
            start, start_cpu = time.perf_counter(), child_cpu()
            subprocess.run([str(env_dir / "bin" / "python"), "-c", "pass"], check=True)
            times[key].append(time.perf_counter() - start)
            cpu[key].append(child_cpu() - start_cpu)
    importtime = subprocess.run(
        [str(hooked / "bin" / "python"), "-X", "importtime", "-c", "pass"],
        capture_output=True, text=True,
    ).stderr
    own = [line for line in importtime.splitlines() if "_fapm_merge_startup" in line]
    # The same work repeated 2000 times in one warm process: the .pth line exec'd,
    # module re-imported from its .pyc, finder installed. The minimum is the
    # intrinsic cost; other processes on the machine can only add to it.
    loop = ("import sys, time; sys.path.append(%r); line = open(%r).read(); "
            "best = []\n"
            "for _ in range(2000):\n"
            "    sys.modules.pop('_fapm_merge_startup', None)\n"
            "    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "
            "'_MergekitMethodsFinder']\n"
            "    t = time.perf_counter(); exec(line); best.append(time.perf_counter() - t)\n"
            "best.sort(); print(best[0], best[len(best) // 2])"
            % (str(hooked_site), str(hooked_site / "fapm_merge.pth")))
    loop_min, loop_median = map(float, subprocess.run(
        [str(bare / "bin" / "python"), "-S", "-c", loop],
        capture_output=True, text=True, check=True).stdout.split())
    result = {
        "runs": runs,
        "bare_median_ms": 1000 * statistics.median(times["bare"]),
        "hooked_median_ms": 1000 * statistics.median(times["hooked"]),
        "importtime_line": own[0] if own else None,
        "warm_loop_min_ms": 1000 * loop_min,
        "warm_loop_median_ms": 1000 * loop_median,
        "bare_min_ms": 1000 * min(times["bare"]),
        "hooked_min_ms": 1000 * min(times["hooked"]),
    }
    result["added_ms"] = result["hooked_median_ms"] - result["bare_median_ms"]
    result["bare_cpu_median_ms"] = 1000 * statistics.median(cpu["bare"])
    result["hooked_cpu_median_ms"] = 1000 * statistics.median(cpu["hooked"])
    result["added_cpu_ms"] = result["hooked_cpu_median_ms"] - result["bare_cpu_median_ms"]
    return result


if __name__ == "__main__" and "--measure" in sys.argv:
    print(json.dumps(measure(), indent=2))
elif __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
