"""Where per-model work runs: in this process, or as Ray tasks (the extra ``distributed``).

Both executors have one method, ``ordered(function, jobs, arguments, limit=,
before_submit=)``, so one loop (``tune``'s) drives either. :class:`SerialExecutor`
runs the jobs one after another here; a job that raises stops the run (the error
propagates, as from any function call). :class:`RayExecutor` runs them as Ray
tasks, at most ``limit`` in flight (``tune`` sets it to ``--max-on-disk``: every task in flight
may hold one merged checkpoint on disk), and hands the outcomes back **in the
jobs' order** as soon as each one and all before it are done, so the caller
writes its results file in the same order as a serial run. A task that raises
does not stop the others: its outcome is a :class:`TaskFailure` naming the cause.

Resources per task: ``gpus`` GPUs when it is at least 1 (Ray sets
``CUDA_VISIBLE_DEVICES``, so ``cuda`` in the task is its first GPU; more than one for
a model that vLLM splits with ``tensor_parallel_size``), else one CPU. The function and its arguments travel by
pickle: the function must be importable on the workers (fapm-merge installed in
the same environment on every node), and every path must mean the same thing
there (one machine, or a shared file system mounted at the same path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

from fapm_merge.core.errors import FapmMergeError


class ExecutorError(FapmMergeError, RuntimeError):
    """Ray is missing or cannot be reached; the message says what to do."""


@dataclass(frozen=True)
class TaskFailure:
    """A job whose task raised: ``message`` is ``Type: text`` of the original error."""

    message: str


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # RayTaskError wraps the worker's exception
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


class Executor:
    """What ``tune``'s loop drives: :meth:`ordered` (see the module docstring)."""

    concurrent = False
    """Whether jobs run side by side (then each merges its own variant)."""

    def ordered(
        self,
        function: Callable,
        jobs: Sequence,
        arguments: Tuple = (),
        *,
        limit: int,
        before_submit: Optional[Callable[[int], None]] = None,
    ) -> Iterator[Tuple[int, Union[object, TaskFailure]]]:
        """``function(job, *arguments)`` for every job, at most ``limit`` at once.

        Yields ``(index, result)`` in the order of ``jobs`` (a :class:`TaskFailure`
        for a job that raised, where the executor isolates jobs).
        ``before_submit(index)`` runs in this process right before job ``index``
        starts (a disk check); if it raises, nothing more starts and the error
        propagates (after the jobs in flight are awaited and yielded).
        """
        return self._ordered(function, jobs, arguments, limit, before_submit)

    def _ordered(self, function, jobs, arguments, limit, before_submit):
        raise NotImplementedError


class SerialExecutor(Executor):
    """Run jobs one after another in this process (see the module docstring); an
    error, in a job or in ``before_submit``, propagates."""

    def _ordered(self, function, jobs, arguments, limit, before_submit):
        for index, job in enumerate(jobs):
            if before_submit is not None:
                before_submit(index)
            yield index, function(job, *arguments)


class RayExecutor(Executor):
    """Run jobs as Ray tasks (see the module docstring).

    Args:
        address (`str`): ``"local"`` starts a Ray instance on this machine (all its
            CPUs and GPUs); anything else is passed to ``ray.init(address=...)``
            (``auto``, ``HOST:6379``, ``ray://HOST:10001`` with ``ray[client]``).
            When this process already runs Ray (``ray.init`` was called), that
            instance is used as it is.
        gpus (`int`, defaults to 0): GPUs per task; 0 runs each task on one CPU.

    Raises:
        ExecutorError: Ray is not installed, cannot start or cannot be reached, or
            more GPUs per task were asked than the cluster has.
    """

    concurrent = True
    """Up to ``limit`` jobs run side by side, in other processes."""

    def __init__(self, address: str = "local", *, gpus: int = 0):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--ray needs Ray: pip install 'fapm-merge[distributed]'") from None
        self._ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address,
                         include_dashboard=False, ignore_reinit_error=True)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ExecutorError(f"--ray {address}: Ray cannot start or reach that cluster "
                                    f"({_describe(error)})") from None
        self.gpus = gpus
        available = ray.cluster_resources().get("GPU", 0)
        if gpus > available:
            raise ExecutorError(f"--ray {address}: --device cuda asks {gpus} GPU(s) per task, but "
                                f"the Ray cluster has {available:g}; use --device cpu, fewer "
                                "--ray-gpus or a cluster with more GPUs")

    def _ordered(self, function, jobs, arguments, limit, before_submit):
        # a task that raises does not stop the others: its outcome is a TaskFailure
        ray = self._ray
        resources = {"num_gpus": self.gpus, "num_cpus": 1} if self.gpus else {"num_cpus": 1}
        # retries would run a failed merge again behind the caller's back: report, never retry
        remote = ray.remote(max_retries=0, **resources)(function)
        shared = [ray.put(a) for a in arguments]  # sent to the object store once, not per task
        pending = {}  # ObjectRef -> index
        ready = {}  # index -> outcome, waiting for the jobs before it
        submitted = emitted = 0
        stop: Optional[BaseException] = None
        while emitted < len(jobs):
            while stop is None and submitted < len(jobs) and len(pending) < limit:
                try:
                    if before_submit is not None:
                        before_submit(submitted)
                except BaseException as error:  # noqa: BLE001 (re-raised below, after the rest)
                    stop = error
                    break
                pending[remote.remote(jobs[submitted], *shared)] = submitted
                submitted += 1
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    ready[index] = ray.get(ref)
                except Exception as error:  # noqa: BLE001 (the task's own failure)
                    ready[index] = TaskFailure(_describe(error))
            while emitted in ready:
                yield emitted, ready.pop(emitted)
                emitted += 1
        if stop is not None:
            raise stop


__all__ = ["Executor", "ExecutorError", "RayExecutor", "SerialExecutor", "TaskFailure"]
