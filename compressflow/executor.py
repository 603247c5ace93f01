"""Where a sweep's variants run: the executor contract, and the built-in local one.

A sweep hands its executor one :class:`SweepJob` a variant; the executor runs
:func:`run_job` on each, wherever it schedules work (worker processes here, a Ray cluster
through the ``compressflow_ray`` plugin), and returns one :class:`VariantOutcome` a job, in
the jobs' order. Variants share their first stages (the baseline) by stage reuse: a stage
is computed under a lock on its key, so the first variant to get there computes and logs it
and the others find it in the store. The lock must hold wherever the executor runs work:
:class:`FileLocks` serves processes on one host; an executor spanning hosts brings its own.

Executors are registered by plugins (``register_executors``) and named by
``compressflow run --executor NAME``; ``local`` is built in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator

KeyLocks = Callable[[str], ContextManager[Any]]
"""``locks(key)``: a context manager holding the lock on one stage key, across every worker."""


@dataclass
class VariantOutcome:
    """How a variant ended: FINISHED, GATE_FAILED, FAILED or KILLED, with its parent run."""

    variant: int
    status: str
    run_id: str | None = None
    reused: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class SweepJob:
    """What a worker needs to run one variant; picklable: the plan is rebuilt in the worker
    from the pipeline file (an absolute path) and the variant's values."""

    path: str
    overrides: list[Any]
    index: int
    values: dict[str, Any]
    uri: str
    experiment: str
    sweep_id: str
    cwd: str = field(default_factory=os.getcwd)
    """The driver's working folder: relative paths in the pipeline's values resolve from it."""
    environment: dict[str, str] = field(default_factory=dict)
    """Variables the worker sets before it runs (``COMPRESSFLOW_TRUSTED_ONLY``)."""
    locks: KeyLocks | None = None
    """The executor's stage-key locks; None runs unlocked (one worker)."""

    def with_locks(self, locks: KeyLocks) -> SweepJob:
        """A copy of the job that locks stage keys with ``locks``."""
        return dataclasses.replace(self, locks=locks)


@dataclass
class ExecutorOptions:
    """What ``compressflow run`` passes every executor."""

    jobs: int = 1
    """``--jobs``: variants run at once where the executor decides it (local processes)."""
    address: str | None = None
    """``--address``: the cluster to run on (Ray: ``auto``, ``ray://host:10001``); None: the
    executor's own default (Ray: a local cluster on this machine)."""


class SweepExecutor:
    """Runs a sweep's jobs. Subclass it, set ``name``, implement :meth:`run`, and register
    an instance in ``register_executors``.

    :meth:`run` calls :func:`run_job` once a job, anywhere that has compressflow and the
    pipeline's plugins installed and reaches the tracking store; it gives each job locks
    that hold across its workers (:meth:`SweepJob.with_locks`). A job's own failure is in
    its outcome, never raised. Ctrl-C (KeyboardInterrupt in ``run``) cancels the jobs still
    running so that each marks its runs KILLED, then is raised again.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def run(self, jobs: list[SweepJob], options: ExecutorOptions) -> list[VariantOutcome]:
        """Run every job; one outcome a job, in the jobs' order."""
        raise NotImplementedError


@dataclass(frozen=True)
class FileLocks:
    """Stage-key locks as files in ``folder`` (``fcntl.flock``): they hold across the
    processes of one host, not across hosts."""

    folder: str

    @classmethod
    def for_sweep(cls, sweep_id: str) -> FileLocks:
        """Locks in a new temporary folder of the sweep ``sweep_id``."""
        import tempfile

        return cls(tempfile.mkdtemp(prefix=f"compressflow-sweep-{sweep_id}-"))

    def __call__(self, key: str) -> ContextManager[None]:
        return file_lock(Path(self.folder), key)


@contextlib.contextmanager
def file_lock(folder: Path, key: str) -> Iterator[None]:
    """An exclusive lock on ``folder/key.lock`` (held across processes)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LocalExecutor(SweepExecutor):
    """``--jobs`` variants at a time in worker processes of this machine (spawned); Ctrl-C
    reaches the workers through the process group. (With ``--jobs 1`` the sweep runs its
    variants in its own process instead, on the plans it validated.)"""

    name = "local"
    description = "variants in worker processes on this machine (--jobs at a time)"

    def run(self, jobs: list[SweepJob], options: ExecutorOptions) -> list[VariantOutcome]:
        locks = FileLocks.for_sweep(jobs[0].sweep_id)
        jobs = [job.with_locks(locks) for job in jobs]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max(1, options.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(run_job, jobs))


def run_job(job: SweepJob, plan: Any = None) -> VariantOutcome:
    """Run one variant with stage reuse and the job's locks: validate it (unless ``plan``,
    its validated plan, is given), run it, and say how it ended. A gate or stage failure is
    the outcome's status; Ctrl-C marks the runs KILLED and is raised."""
    os.environ.update(job.environment)
    with _working_folder(job.cwd):
        return _run_variant(job, plan)


def _run_variant(job: SweepJob, plan: Any) -> VariantOutcome:
    from compressflow.engine import validate
    from compressflow.errors import CompressflowError
    from compressflow.gates import GateFailed
    from compressflow.plugins import load_plugins
    from compressflow.runner import PipelineRunner
    from compressflow.sweep import Variant
    from compressflow.tracking import Tag

    if plan is None:  # in a worker: its own plugins, the same validation
        plan = validate(job.path, [*job.overrides, *job.values.items()], load_plugins())
    runner = PipelineRunner(
        plan, job.uri, job.experiment, reuse=True, lock=job.locks,
        tags={Tag.SWEEP_ID: job.sweep_id, Tag.VARIANT: str(job.index)},
        params={f"sweep.{path}": value for path, value in job.values.items()},
        register=False, run_name=f"{plan.spec.name} [{Variant(job.index, job.values, plan).label}]")
    outcome = VariantOutcome(job.index, "FINISHED")
    try:
        runner.run()
    except GateFailed as error:
        outcome.status, outcome.message = "GATE_FAILED", error.message
    except CompressflowError as error:
        outcome.status, outcome.message = "FAILED", error.message
    finally:
        runner.cleanup()
    outcome.run_id = runner.ctx.run_id
    outcome.reused = list(runner.reused)
    outcome.computed = [name for name in runner.ctx.results if name not in runner.reused]
    return outcome


@contextlib.contextmanager
def _working_folder(folder: str) -> Iterator[None]:
    # a worker elsewhere may lack the driver's folder: then it keeps its own
    previous = os.getcwd()
    moved = folder != previous and os.path.isdir(folder)
    if moved:
        os.chdir(folder)
    try:
        yield
    finally:
        if moved:
            os.chdir(previous)
