"""Progress without a terminal (issue 22): `tune ... > log` showed nothing until the end."""

import io
from datetime import datetime

from fapm_merge.workflows.progress import LogLines, duration, progress_reporter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_per_step_with_time_count_detail_and_what_is_left():
    out, clock = io.StringIO(), Clock()
    log = LogLines("tune", {"variants": "merge + evaluate variants"}, stream=out, clock=clock,
                   now=lambda: datetime(2026, 12, 7, 9, 30, 5))
    log("variants", 0, 4, "merging fapm-s0.5, fapm-s0.7")
    clock.t = 30
    log("variants", 1, 4, "evaluated fapm-s0.5")
    clock.t = 60
    log("variants", 2, 4, "evaluated fapm-s0.7")
    lines = out.getvalue().splitlines()
    assert lines == [
        "2026-12-07 09:30:05 | tune | merge + evaluate variants | 0/4 | merging fapm-s0.5, fapm-s0.7 | 0 s elapsed",
        "2026-12-07 09:30:05 | tune | merge + evaluate variants | 1/4 | evaluated fapm-s0.5 | 30 s elapsed, about 1.5 min left",
        "2026-12-07 09:30:05 | tune | merge + evaluate variants | 2/4 | evaluated fapm-s0.7 | 60 s elapsed, about 60 s left",
    ]


def test_many_small_steps_are_thinned_but_the_last_is_always_written():
    out, clock = io.StringIO(), Clock()
    log = LogLines("sweep", stream=out, clock=clock, every=10)
    for step in range(1, 101):  # a sweep reports every tensor
        clock.t = step * 0.5
        log("tensors", step, 100, "")
    lines = out.getvalue().splitlines()
    assert 4 <= len(lines) <= 6  # one about every 10 s of 50 s, plus the last
    assert "| 100/100 |" in lines[-1]


def test_a_pipe_gets_lines_not_bars():
    out = io.StringIO()  # not a terminal, as stderr under Slurm or nohup
    with progress_reporter("eval", stream=out) as report:
        report("models", 1, 2, "base")
    assert "| eval | models | 1/2 | base |" in out.getvalue()


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (41, 150, 7200)] == ["41 s", "2.5 min", "2.0 h"]
