"""Training across processes: ``distributed: {nproc: N}`` on any stage that trains.

The training loop (:mod:`compressflow.training`) runs in N processes started by torchrun's
elastic launcher (``torch.distributed.launcher.elastic_launch``, a c10d rendezvous on a
free loopback port), each with its own rank: the model wrapped in DistributedDataParallel,
the training split cut by a DistributedSampler (shuffled by the stage's seed and the epoch),
gradients averaged over the ranks at every step, so every rank takes the same optimizer
step and ends with the same weights (each rank's digest is compared, and a difference is
the stage's failure). The pipeline's ``batch_size`` stays the global batch: each rank takes
its share, so N processes take the steps one process takes.

Rank 0 alone evaluates after each epoch; the stage's process, which holds the MLflow run,
logs rank 0's figures and loads rank 0's weights when the ranks are done: no rank writes
to the store. The workers are forked (Linux), so a stage's own loss (a teacher, a
projection) reaches them without pickling.

Several machines (``nnodes: M``, ``rdzv_endpoint: HOST:PORT``): the stage's machine hosts
the rendezvous at HOST:PORT, as torchrun's ``--rdzv-endpoint``, and each other machine runs
``compressflow join HOST:PORT --nproc N --nnodes M`` (:func:`join`), whose ranks hold no
stage: once the group is formed, the stage's first rank (the *lead*, which takes rank 0's
part above; torch orders the machines itself) sends them the whole job, cloudpickled (the
loop, the model, the loss, the data), so the other machines need compressflow and the
pipeline's plugins installed, not its files or its store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compressflow.errors import CompressflowError, ConfigError, StageFailed

if TYPE_CHECKING:
    from torch import nn


ENDPOINT = r"^[^\s:]+:[0-9]{1,5}$"
"""HOST:PORT, as torchrun's --rdzv-endpoint takes it."""


class DistributedSpec(BaseModel):
    """``distributed:`` of a training stage."""

    model_config = ConfigDict(extra="forbid")

    nproc: int = Field(2, ge=1, le=64, description="processes on each machine (torchrun's "
                       "--nproc-per-node); 1 on one machine trains in the stage's own process")
    nnodes: int = Field(1, ge=1, le=256, description="machines (torchrun's --nnodes): this one "
                        "and nnodes - 1 that run `compressflow join RDZV_ENDPOINT`")
    rdzv_endpoint: str | None = Field(
        None, pattern=ENDPOINT, description="HOST:PORT at which the other "
        "machines reach this one, which hosts the rendezvous there (torchrun's "
        "--rdzv-endpoint); needed with nnodes > 1")
    join_timeout_s: int = Field(600, ge=1, description="how long every machine has to join")
    backend: Literal["gloo"] = Field(
        "gloo", description="torch.distributed backend: gloo (CPU); nccl is not built yet")

    @model_validator(mode="after")
    def _endpoint_for_nodes(self):
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("nnodes > 1 needs rdzv_endpoint: HOST:PORT of this machine, where "
                             "the other machines run `compressflow join HOST:PORT`")
        return self

    @property
    def world(self) -> int:
        """Ranks in the group: nproc on each of nnodes machines."""
        return self.nproc * self.nnodes


def launch(body: Callable[[Any], dict[str, Any]], spec: DistributedSpec) -> list[dict[str, Any]]:
    """Run ``body(group)`` in ``spec.world`` ranks; the results of this machine's ranks, in
    rank order. ``group`` is :class:`Group` (rank, world size, the lead, the all-reduce of
    figures). A rank that raises fails them all: its error is raised here as a StageFailed
    naming the rank; machines that do not join in time fail the stage too."""
    endpoint = spec.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    run_id = JOINED_RUN if spec.nnodes > 1 else uuid.uuid4().hex
    return _launch((body, spec.backend, spec.nnodes), spec.nproc, spec.nnodes, endpoint,
                   run_id=run_id, host=True, timeout=spec.join_timeout_s)


def join(endpoint: str, *, nproc: int, nnodes: int, backend: str = "gloo",
         timeout: int = 600) -> int:
    """This machine's ``nproc`` ranks in the group a stage hosts at ``endpoint`` (``HOST:PORT``)
    with ``nnodes`` machines: they wait for it, take the job it sends and train. Returns the
    ranks served; a rank's failure is a StageFailed, no stage within ``timeout`` s a
    CompressflowError."""
    if not re.fullmatch(ENDPOINT, endpoint):
        raise ConfigError(f"join: {endpoint!r} is not HOST:PORT",
                          "give the stage's distributed.rdzv_endpoint, e.g. 10.0.0.5:29400")
    _launch((None, backend, nnodes), nproc, nnodes, endpoint, run_id=JOINED_RUN, host=False,
            timeout=timeout)
    return nproc


JOINED_RUN = "compressflow"
"""The rendezvous id of a group over several machines: one that every machine knows."""


def _launch(job: tuple[Any, str, int], nproc: int, nnodes: int, endpoint: str, *, run_id: str,
            host: bool, timeout: int) -> list[dict[str, Any]]:
    import tempfile

    import torch
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, torch.get_num_threads() // nproc)
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          run_id=run_id, rdzv_backend="c10d", rdzv_endpoint=endpoint,
                          rdzv_configs={"is_host": host, "join_timeout": timeout,
                                        "read_timeout": timeout},
                          max_restarts=0, monitor_interval=0.1, start_method="fork")
    with tempfile.TemporaryDirectory(prefix="compressflow-ranks-") as errors, _launcher_quiet():
        try:
            results = elastic_launch(config, _rank)(*job[:2], threads, errors, job[2])
        except RendezvousError as error:
            raise _rendezvous_error(endpoint, nnodes, nproc, timeout, host, error) from None
        except Exception as error:  # ChildFailedError: a rank raised, the others were stopped
            raise _rank_error(Path(errors), nproc * nnodes) from error
    return [results[rank] for rank in sorted(results)]


def _rendezvous_error(endpoint: str, nnodes: int, nproc: int, timeout: int, host: bool,
                      error: Exception) -> CompressflowError:
    detail = f"{type(error).__name__}: {error}".splitlines()[0]
    if host:
        return StageFailed(
            f"distributed training: the {nnodes} machines did not meet at {endpoint} within "
            f"{timeout} s ({detail})",
            f"run `compressflow join {endpoint} --nproc {nproc} --nnodes {nnodes}` on each of "
            f"the {nnodes - 1} other machine(s), or raise distributed.join_timeout_s")
    return CompressflowError(
        f"join: no stage formed a group of {nnodes} machines at {endpoint} within {timeout} s "
        f"({detail})", "start the pipeline whose stage has distributed.rdzv_endpoint "
        f"{endpoint}, with the same nproc and nnodes; check that this machine reaches it")


@contextlib.contextmanager
def _launcher_quiet() -> Iterator[None]:
    """torchelastic's own log lines (events, a rank's traceback) stay out of the user's
    terminal: a failure is reported once, by the stage."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _rank(body: Callable[[Any], dict[str, Any]] | None, backend: str, threads: int, errors: str,
          nnodes: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        body, lead = _shared_job(body) if nnodes > 1 else (body, 0)
        result = body(Group(rank, dist.get_world_size(), lead))
        if isinstance(result, dict) and "digest" in result:  # every rank's, for the check
            digests: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(digests, result["digest"])
            result = {**result, "digests": digests}
        return result
    except BaseException as error:  # told to the stage's process, which raises it
        hint = getattr(error, "hint", "")
        message = error.message if isinstance(error, CompressflowError) else f"{type(error).__name__}: {error}"
        (Path(errors) / f"{rank}.json").write_text(json.dumps(
            {"own": isinstance(error, CompressflowError), "message": message, "hint": hint}))
        raise
    finally:
        dist.destroy_process_group()


def _shared_job(body: Callable[[Any], dict[str, Any]] | None):
    """``(body, lead)``: the stage's first rank (the lead) sends its body, cloudpickled, to
    the ranks of machines that joined without one."""
    import cloudpickle
    import torch.distributed as dist

    holders: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(holders, body is not None)
    if True not in holders:
        raise CompressflowError("distributed: no machine of the group runs a stage: only "
                                "`compressflow join` ones met", "start the pipeline on the "
                                "machine named by rdzv_endpoint")
    lead = holders.index(True)
    payload = [cloudpickle.dumps(body) if dist.get_rank() == lead else None]
    dist.broadcast_object_list(payload, src=lead)
    return (body if body is not None else cloudpickle.loads(payload[0])), lead


def _rank_error(errors: Path, nproc: int) -> StageFailed:
    """The failure to report: a rank's own error (a diverged loss) before the others'
    (their peer gone), the lowest rank first."""
    told = []
    for path in errors.glob("*.json"):  # this machine's ranks, whichever numbers they have
        error = json.loads(path.read_text())
        told.append((not error["own"], int(path.stem), error))
    if not told:
        return StageFailed(f"distributed training failed: a rank of {nproc} ended without a word",
                           "run the stage with nproc: 1 to see the error in one process")
    _, rank, error = min(told, key=lambda t: t[:2])
    return StageFailed(f"distributed training, rank {rank} of {nproc}: {error['message']}",
                       error["hint"] or "run the stage with nproc: 1 to see the error in one process")


class Group:
    """One rank's view: its rank, the world size, the lead's rank (the stage's first rank,
    which evaluates and hands back the weights; 0 on one machine), and sums over every rank."""

    def __init__(self, rank: int, world: int, lead: int = 0) -> None:
        self.rank, self.world, self.lead = rank, world, lead

    @property
    def leads(self) -> bool:
        """Whether this rank is the lead."""
        return self.rank == self.lead

    def sum(self, *values: float) -> list[float]:
        """Each value summed over every rank."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (CPU; layers a task leaves unused, such as an
        encoder's pooler, allowed)."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, static_graph=True)

    def average_grads(self, modules: list[nn.Module]) -> None:
        """Average the gradients of modules trained beside the wrapped model (a distillation
        projection used by the loss, outside the model's forward)."""
        import torch.distributed as dist

        for module in modules:
            for param in module.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= self.world

    def loader(self, loader, seed: int):
        """The training loader cut for this rank: a DistributedSampler over its dataset
        (shuffled by ``seed`` and the epoch) and this rank's share of the batch."""
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        from compressflow.data import batch_size

        if not hasattr(loader.dataset, "__len__"):
            raise ConfigError("distributed training needs a dataset of known length (map-style)",
                              "drop distributed: from the stage, or use a map-style dataset")
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=seed)
        batch = max(1, math.ceil(batch_size(loader) / self.world))
        return DataLoader(loader.dataset, batch_size=batch, sampler=sampler,
                          collate_fn=loader.collate_fn)


def digest(modules: list[nn.Module]) -> str:
    """A sha256 of every parameter: equal on ranks holding equal weights. Buffers (running
    statistics, observers) are left out: DDP takes rank 0's at every forward, and rank 0's
    are the ones kept."""
    sha = hashlib.sha256()
    for module in modules:
        for name, tensor in module.named_parameters():
            sha.update(name.encode())
            sha.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()


def check_identical(results: list[dict[str, Any]]) -> None:
    """Every rank ended with the same weights, or the stage fails naming them."""
    digests = results[0].get("digests") or [r["digest"] for r in results]
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise StageFailed(f"distributed training: rank(s) {differing} ended with weights that "
                          "differ from rank 0's", "run with nproc: 1; a step that is not the "
                          "same on every rank (a random draw outside the seed) breaks DDP")


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1 (a one-machine group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
