"""``compressflow join``: this machine's processes in a training stage hosted by another."""

from __future__ import annotations

from typing import Annotated

import typer

from compressflow.cli.errors import reports_errors


@reports_errors
def join(
    endpoint: Annotated[str, typer.Argument(
        help="HOST:PORT: the stage's distributed.rdzv_endpoint.", show_default=False)],
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Processes on this machine: the stage's distributed.nproc.")] = 2,
    nnodes: Annotated[int, typer.Option(
        "--nnodes", min=2, help="Machines in the group: the stage's distributed.nnodes.")] = 2,
    stages: Annotated[int, typer.Option(
        "--stages", min=1, help="Stages to serve, one after the other, before exiting.")] = 1,
    timeout: Annotated[int, typer.Option(
        "--timeout", min=1, help="Seconds to wait for each stage to start.")] = 600,
) -> None:
    """Lend this machine's processes to a training stage that runs across machines.

    Run it on every machine but the stage's own, with the stage's `distributed:` values. Once
    every machine has joined, the stage sends the job (model, data, loss) and logs everything
    itself: this machine needs compressflow and the pipeline's plugins installed, not the
    pipeline's files or its MLflow store.
    """
    from compressflow.distributed import join as join_group

    for served in range(1, stages + 1):
        join_group(endpoint, nproc=nproc, nnodes=nnodes, timeout=timeout)
        typer.echo(f"join: stage {served} of {stages} trained here ({nproc} processes)")
