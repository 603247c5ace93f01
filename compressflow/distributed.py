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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from compressflow.errors import CompressflowError, ConfigError, StageFailed

if TYPE_CHECKING:
    from torch import nn


class DistributedSpec(BaseModel):
    """``distributed:`` of a training stage."""

    model_config = ConfigDict(extra="forbid")

    nproc: int = Field(2, ge=1, le=64, description="processes on this machine (torchrun's "
                       "--nproc-per-node); 1 trains in the stage's own process")
    backend: Literal["gloo"] = Field(
        "gloo", description="torch.distributed backend: gloo (CPU); nccl is not built yet")


def launch(body: Callable[[Any], dict[str, Any]], spec: DistributedSpec) -> list[dict[str, Any]]:
    """Run ``body(group)`` in ``spec.nproc`` ranks; their results in rank order. ``group``
    is :class:`Group` (rank, world size, the all-reduce of figures). A rank that raises
    fails them all: its error is raised here as a StageFailed naming the rank."""
    import tempfile

    import torch
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, torch.get_num_threads() // spec.nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=spec.nproc,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.1, start_method="fork")
    with tempfile.TemporaryDirectory(prefix="compressflow-ranks-") as errors, _launcher_quiet():
        try:
            results = elastic_launch(config, _rank)(body, spec.backend, threads, errors)
        except Exception as error:  # ChildFailedError: a rank raised, the others were stopped
            raise _rank_error(Path(errors), spec.nproc) from error
    return [results[rank] for rank in sorted(results)]


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


def _rank(body: Callable[[Any], dict[str, Any]], backend: str, threads: int, errors: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        return body(Group(rank, dist.get_world_size()))
    except BaseException as error:  # told to the stage's process, which raises it
        hint = getattr(error, "hint", "")
        message = error.message if isinstance(error, CompressflowError) else f"{type(error).__name__}: {error}"
        (Path(errors) / f"{rank}.json").write_text(json.dumps(
            {"own": isinstance(error, CompressflowError), "message": message, "hint": hint}))
        raise
    finally:
        dist.destroy_process_group()


def _rank_error(errors: Path, nproc: int) -> StageFailed:
    """The failure to report: a rank's own error (a diverged loss) before the others'
    (their peer gone), the lowest rank first."""
    told = []
    for rank in range(nproc):
        path = errors / f"{rank}.json"
        if path.is_file():
            error = json.loads(path.read_text())
            told.append((not error["own"], rank, error))
    if not told:
        return StageFailed(f"distributed training failed: a rank of {nproc} ended without a word",
                           "run the stage with nproc: 1 to see the error in one process")
    _, rank, error = min(told, key=lambda t: t[:2])
    return StageFailed(f"distributed training, rank {rank} of {nproc}: {error['message']}",
                       error["hint"] or "run the stage with nproc: 1 to see the error in one process")


class Group:
    """One rank's view: its rank, the world size, and sums over every rank."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

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

        if not hasattr(loader.dataset, "__len__"):
            raise ConfigError("distributed training needs a dataset of known length (map-style)",
                              "drop distributed: from the stage, or use a map-style dataset")
        sampler = DistributedSampler(loader.dataset, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=seed)
        batch = max(1, math.ceil((loader.batch_size or 1) / self.world))
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
    digests = [r["digest"] for r in results]
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise StageFailed(f"distributed training: rank(s) {differing} ended with weights that "
                          "differ from rank 0's", "run with nproc: 1; a step that is not the "
                          "same on every rank (a random draw outside the seed) breaks DDP")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
