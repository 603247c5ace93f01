"""Sweeps on Ray: ``compressflow run sweep.yaml --executor ray [--address ...]``.

Each variant is one Ray task (one CPU) that runs :func:`compressflow.executor.run_job`:
the same validation, stage reuse and logging as ``--jobs``, so its figures are those of a
``--jobs 1`` run for the same seeds. Stage-key locks are a Ray actor (:class:`KeyLockActor`)
created by the sweep: a lock lives in the cluster, not in a file, so a shared baseline is
computed once whichever host's worker gets there first. Ctrl-C cancels the tasks still
running (``ray.cancel``: a KeyboardInterrupt in each), which mark their runs KILLED.

``--address``: none starts a local Ray instance for the sweep and stops it after;
``auto``, ``HOST:6379`` or ``ray://HOST:10001`` joins a running cluster. Every worker needs
compressflow and the pipeline's plugins installed, the pipeline's files at the same path
(a shared folder), and a tracking store it reaches: an ``http://`` MLflow server across
hosts (a sqlite file serves one host only).

Ray is imported only when a sweep runs on it (``pip install compressflow[ray]``), so this
plugin loads, and says what to install, without it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from compressflow import (ConfigError, ExecutorOptions, SweepExecutor, SweepJob, VariantOutcome,
                          hookimpl, run_job)

CANCEL_WAIT_S = 120.0  # how long cancelled tasks get to mark their runs KILLED


def _ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ConfigError("--executor ray needs Ray, which is not installed",
                          "pip install 'compressflow[ray]'") from error
    return ray


def _join(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (None: start a local one), or say why not."""
    _answers(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--executor ray: cannot join the Ray cluster at {address or 'a new local instance'}: {last}",
            "start it (ray start --head) and check --address (auto, HOST:6379, ray://HOST:10001); "
            "a cluster with token authentication (ray start's default) needs RAY_AUTH_MODE=token "
            "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here too") from error


def _answers(address: str | None, timeout: float = 5.0) -> None:
    """A cluster named by host and port must accept a connection within ``timeout``:
    ray.init itself retries an absent one for minutes."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--address {address}: no port", "write auto, HOST:6379 or ray://HOST:10001")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--executor ray: no Ray cluster answers at {address} ({error})",
                          "start it (ray start --head) or check --address (auto, HOST:6379, "
                          "ray://HOST:10001)") from error


class KeyLockActor:
    """One asyncio lock per stage key, held by a task of the sweep (a Ray actor: its
    methods run one at a time on one event loop, so ``acquire`` can wait without blocking
    ``release``)."""

    def __init__(self) -> None:
        self.locks: dict[str, Any] = {}

    async def acquire(self, key: str) -> None:
        import asyncio

        await self.locks.setdefault(key, asyncio.Lock()).acquire()

    async def release(self, key: str) -> None:
        self.locks[key].release()


@dataclass(frozen=True)
class ActorLocks:
    """Stage-key locks held in a :class:`KeyLockActor`: picklable, valid on every host."""

    actor: Any

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        ray = _ray()
        ray.get(self.actor.acquire.remote(key))
        try:
            yield
        finally:
            ray.get(self.actor.release.remote(key))


def _task(job: SweepJob) -> VariantOutcome:
    """One variant in a Ray worker. ray.cancel interrupts a running task with SIGINT: a
    worker whose node was started where SIGINT is ignored (a background job, a service)
    would never see it, so the task listens for it."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_job(job)


class RayExecutor(SweepExecutor):
    """Each variant a Ray task; stage-key locks in a Ray actor."""

    name = "ray"
    description = "each variant a Ray task (--address: a running cluster; default: a local one)"

    def run(self, jobs: list[SweepJob], options: ExecutorOptions) -> list[VariantOutcome]:
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            _join(ray, options.address)
        try:
            locks = ActorLocks(ray.remote(KeyLockActor).remote())
            remote = ray.remote(num_cpus=1, max_retries=0)(_task)
            refs = [remote.remote(job.with_locks(locks)) for job in jobs]
            try:
                return [self._outcome(ray, ref, job) for ref, job in zip(refs, jobs)]
            except KeyboardInterrupt:
                self._cancel(ray, refs)
                raise
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _outcome(ray: Any, ref: Any, job: SweepJob) -> VariantOutcome:
        """The task's outcome; a task that died or raised is that variant's failure alone."""
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return VariantOutcome(job.index, "KILLED", message="cancelled")
        except ray.exceptions.RayError as error:
            status = "FAILED" if isinstance(error, ray.exceptions.RayTaskError) else "KILLED"
            first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            return VariantOutcome(job.index, status, message=f"on Ray: {first}")

    @staticmethod
    def _cancel(ray: Any, refs: list[Any]) -> None:
        """Cancel what still runs and give it time to mark its runs KILLED."""
        _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in running:
            with contextlib.suppress(Exception):  # finished meanwhile
                ray.cancel(ref, force=False)
        with contextlib.suppress(Exception):
            ray.wait(running, num_returns=len(running), timeout=CANCEL_WAIT_S)


@hookimpl
def register_executors(registry) -> None:
    """The ``ray`` executor."""
    registry.add(RayExecutor())


__all__ = ["ActorLocks", "KeyLockActor", "RayExecutor"]
