"""fapm-merge tune --ray on a real local Ray instance against the serial run.

One Ray instance per test session (its start-up takes seconds); the tests share an
xdist group so they run in the same worker (make test: --dist loadgroup). Marked
slow; they run in `make test` like every other test.
"""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the 'distributed' extra (make test installs it)")

from fapm_merge.evaluation.evaluate import EvalSettings  # noqa: E402
from fapm_merge.evaluation.results import read_results  # noqa: E402
from fapm_merge.workflows.demo import DEMO_CONFIG, demo_eval_data, save_pair  # noqa: E402
from fapm_merge.workflows.tradeoff import Rule  # noqa: E402
from fapm_merge.workflows.tune.workdir import SCREENING_FILES  # noqa: E402
from fapm_merge.workflows.tune import TuneError, TuneSettings, run_tune  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

SMALL = dict(DEMO_CONFIG, vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TIMING = ("seconds", "time", "items")  # timing fields, and the items key that hashes them


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        # 3 logical CPUs on this 2-core machine: with --max-on-disk 2, a third task
        # could start if the executor ignored the bound, and DiskWatch would see it
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-pair")
    base, finetuned = save_pair(SMALL, root / "models")
    files = demo_eval_data(base, finetuned, root / "eval", text_tokens=1024, items=24)
    recipe = {"merge_method": "fapm", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(finetuned), "parameters": {"sparsity": 0.9}}]}
    return root, recipe, files


def settings(files, **extra):
    return TuneSettings(text=files["text"], task=files["task"],
                        eval=EvalSettings(tokenizer="bytes", window=128),
                        sparsities=[0.3, 0.9], betas=[1.0], baselines=["magnitude"],
                        rule=extra.pop("rule", Rule("max-cf", max_cf=1e9)), max_on_disk=2,
                        confirm_share=0, **extra)  # the held-out check runs in this process


class DiskWatch:
    """Counts checkpoints in the work folder (finished variants and sweeps in progress)
    every few milliseconds, from another thread: the Ray tasks run in other processes."""

    def __init__(self, work: Path):
        self.work, self.most, self._stop = work, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                variants = [p for p in (self.work / "variants").iterdir() if p.name != "finetuned"] \
                    if (self.work / "variants").exists() else []
                # a staging folder holds a checkpoint while a merge writes it; once moved
                # to variants/ it is empty until removed: counting the folder itself saw
                # one checkpoint twice (a flaky "3 <= 2" in CI)
                staging = [d for s in self.work.glob("batch*") for d in s.iterdir() if d.is_dir()] \
                    if self.work.exists() else []
                self.most = max(self.most, len(variants) + len(staging))
            except FileNotFoundError:
                pass
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def _same_paths(value, work: Path):
    """``value`` with its work folder's path written WORK (the two runs use two folders)."""
    return json.loads(json.dumps(value).replace(str(work), "WORK"))


def _records(work: Path):
    records = read_results(work / "results.jsonl", with_items=True)
    return _same_paths([{k: v for k, v in r.items() if k not in TIMING} for r in records], work)


@pytest.fixture(scope="module")
def serial_run(pair, tmp_path_factory):
    """The serial tune, with a rule that selects a variant (so OUT is written): max-cf
    with a bound between the fine-tune's forgetting and the variants' below it."""
    _, recipe, files = pair
    out = tmp_path_factory.mktemp("serial") / "chosen"
    first = run_tune(recipe, out, settings(files))  # no bound: picks the fine-tune itself
    ft = first.tradeoff.finetuned
    below = [p.cf_pct for p in first.tradeoff.points if p.method not in ("base", "finetuned")
             and p.cf_pct < ft.cf_pct]
    rule = Rule("max-cf", max_cf=(max(below) + ft.cf_pct) / 2)
    result = run_tune(recipe, out, settings(files, rule=rule))
    assert result.evaluated == 0 and result.out_dir == out and result.tradeoff.selected.method != "finetuned"
    return out, first, rule


def test_ray_gives_the_serial_selection_records_and_files(local_ray, pair, serial_run, tmp_path):
    _, recipe, files = pair
    serial_out, serial, rule = serial_run
    out = tmp_path / "chosen"
    work = tmp_path / "chosen.tune"
    with DiskWatch(work) as watch:
        result = run_tune(recipe, out, settings(files, ray="local", rule=rule))
    assert result.evaluated == serial.evaluated == 6 and result.reused == 0
    assert result.out_dir == out.absolute()
    assert result.tradeoff.selected.name == Path(
        json.loads((serial_out / "tradeoff.json").read_text())["selected"]["model"]).name
    # every record equal but for timing, in the plan's order
    serial_work = serial_out.with_name("chosen.tune")
    assert _records(work) == _records(serial_work)
    assert [Path(r["model"]).name for r in _records(work)] == \
        ["base", "finetuned", "fapm-s0.3", "fapm-s0.9", "magnitude-s0.3", "magnitude-s0.9"]
    assert _same_paths(json.loads((work / "tradeoff.json").read_text()), work) == \
        _same_paths(json.loads((serial_work / "tradeoff.json").read_text()), serial_work)
    # the chosen model's folder: the same files, byte for byte
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in serial_out.iterdir())
    for name in names:
        if name != "tradeoff.png":  # a picture of the same numbers; its bytes may carry a date
            mine = (out / name).read_bytes().replace(str(work).encode(), b"WORK")
            theirs = (serial_out / name).read_bytes().replace(str(serial_work).encode(), b"WORK")
            assert mine == theirs, name
    assert 1 <= watch.most <= 2  # --max-on-disk 2: never more checkpoints than that
    assert not any((work / "variants").iterdir())
    assert not list(work.glob("batch*"))


def test_a_failing_task_is_named_the_others_kept_and_a_rerun_retries_only_it(
        local_ray, pair, serial_run, tmp_path):
    _, recipe, files = pair
    serial_out, serial, _ = serial_run
    out = tmp_path / "out"
    work = tmp_path / "out.tune"

    def stop_before_the_variants(stage, done, total, detail):
        if stage == "variants":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the anchors are evaluated serially ...
        run_tune(recipe, out, settings(files), progress=stop_before_the_variants)
    # ... and a broken checkpoint sits where fapm-s0.3 goes: its task's evaluation fails
    broken = work / "variants" / "fapm-s0.3"
    shutil.copytree(Path(recipe["models"][0]["model"]), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])

    with pytest.raises(TuneError) as error:
        run_tune(recipe, out, settings(files, ray="local"))
    message = str(error.value)
    assert message.startswith("1 evaluation(s) failed on Ray: fapm-s0.3: EvalInputError: "
                              "transformers cannot load it")
    assert "Run the same command again to retry only the failed ones" in message
    assert not out.exists()  # nothing written
    assert not broken.exists()  # the failed variant's folder is gone: a rerun merges it afresh
    kept = [Path(r["model"]).name for r in read_results(work / "results.jsonl")]
    assert kept == ["base", "finetuned", "fapm-s0.9", "magnitude-s0.3", "magnitude-s0.9"]

    result = run_tune(recipe, out, settings(files, ray="local"))
    assert result.evaluated == 1 and result.reused == 5
    assert result.tradeoff.selected.name == serial.tradeoff.selected.name
    assert len((work / "results.jsonl").read_text().splitlines()) == 6  # none evaluated twice
    mine = _same_paths({p.name: p.to_json() for p in result.tradeoff.points}, work)
    theirs = _same_paths({p.name: p.to_json() for p in serial.tradeoff.points},
                         serial_out.with_name("chosen.tune"))
    assert len(mine) == 6 and mine == theirs


def test_ray_missing_or_unreachable_is_a_clear_error(pair, tmp_path, monkeypatch):
    import sys

    _, recipe, files = pair
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(TuneError, match=r"--ray needs Ray: pip install 'fapm-merge\[distributed\]'"):
        run_tune(recipe, tmp_path / "o", settings(files, ray="local"))
    assert not (tmp_path / "o.tune").exists()


def test_gpu_tasks_on_a_cluster_without_gpus_are_refused(local_ray):
    from fapm_merge.workflows.executors import ExecutorError, RayExecutor

    with pytest.raises(ExecutorError, match=r"asks 1 GPU\(s\) per task, but the Ray cluster has 0"):
        RayExecutor("local", gpus=1)


def _sleepy(job, folder):
    """A task that sleeps, records when it ran, and fails for job 3."""
    index, seconds = job
    start = time.time()
    time.sleep(seconds)
    (Path(folder) / f"{index}.json").write_text(json.dumps([start, time.time()]))
    if index == 3:
        raise ValueError("job 3 fails on purpose")
    return index


def test_the_executor_bounds_tasks_in_flight_yields_in_order_and_keeps_going(local_ray, tmp_path):
    """Later jobs finish first and job 3 fails: outcomes still come in job order, the
    failure is named, the rest complete, and never more than `limit` ran at once
    (the instance has 3 CPUs, so a third task could run if the bound were ignored)."""
    import sys

    from ray import cloudpickle

    from fapm_merge.workflows.executors import RayExecutor, TaskFailure

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    jobs = [(0, 6.0), (1, 1.0), (2, 4.0), (3, 0.2), (4, 0.5)]
    outcomes = list(RayExecutor("local").ordered(_sleepy, jobs, (str(tmp_path),), limit=2))
    assert [i for i, _ in outcomes] == [0, 1, 2, 3, 4]
    assert [o for _, o in outcomes] == [0, 1, 2, TaskFailure("ValueError: job 3 fails on purpose"), 4]
    spans = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(5)]
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap == 2


def test_a_screened_tune_on_ray_gives_the_serial_verdicts_and_records(local_ray, pair, tmp_path):
    """Screening runs stage by stage on Ray (each stage's tasks side by side, the next
    stage decided from them): the verdicts, the stages and every record are the serial run's."""
    _, recipe, files = pair
    lines = files["text"].read_text().splitlines()
    documents = tmp_path / "documents.jsonl"  # screening shares whole documents
    documents.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 2])}) + "\n"
                                 for i in range(0, len(lines), 2)))
    runs = {}
    for name, extra in (("serial", {}), ("ray", {"ray": "local"})):
        work = tmp_path / f"{name}.tune"
        result = run_tune(recipe, tmp_path / name, settings({**files, "text": documents},
                                                            rule=Rule(min_retention=0.8), **extra))
        report = json.loads((work / "screening.json").read_text())
        assert report["screened"] is True and result.screening == report["summary"]
        runs[name] = (_same_paths(report, work), _records(work),
                      [_same_paths({k: v for k, v in r.items() if k not in TIMING}, work)
                       for file in SCREENING_FILES.values() if (work / file).exists()
                       for r in read_results(work / file, with_items=True)])
    assert runs["ray"] == runs["serial"]
