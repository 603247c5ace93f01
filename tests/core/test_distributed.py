"""Training stages across processes (DDP under torchrun's launcher, gloo): identical weights
on every rank, the accuracy of one process, rank 0's figures logged, failures named."""

from __future__ import annotations

import pytest

from compressflow.distributed import DistributedSpec, check_identical, digest, launch
from compressflow.engine import validate
from compressflow.errors import StageFailed
from compressflow.runner import PipelineRunner
from tests.conftest import write_pipeline


def _train_on_rank_data(group) -> dict:
    """A few DDP steps of a small model, each rank on its own random data."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    wrapped = group.wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + group.rank)
    for _ in range(5):
        x, y = torch.randn(32, 8, generator=data), torch.randint(0, 2, (32,), generator=data)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
    if group.rank == 1 and group.world == 3:  # the case the check must catch
        with torch.no_grad():
            model[0].weight[0, 0] += 1
    return {"digest": digest([model]), "loss_sum": group.sum(float(group.rank))[0]}


def test_every_rank_ends_with_the_same_weights_and_a_rank_that_differs_is_named():
    results = launch(_train_on_rank_data, DistributedSpec(nproc=2))
    assert len(results) == 2 and results[0]["digest"] == results[1]["digest"]
    assert [r["loss_sum"] for r in results] == [1.0, 1.0]  # 0 + 1, seen by both
    check_identical(results)
    differing = launch(_train_on_rank_data, DistributedSpec(nproc=3))
    with pytest.raises(StageFailed, match=r"rank\(s\) \[1\] ended with weights"):
        check_identical(differing)


def _figures(store, experiment, stage):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
              if r.info.run_name == stage]
    return run.data.metrics, client.get_metric_history(run.info.run_id, "val_accuracy")


def test_two_processes_match_one_and_rank_0_alone_is_logged(tmp_path, store):
    # the student learns the teacher's hidden layer through a 16 -> 32 projection: a module
    # trained beside the model, outside its forward, whose gradients are averaged too
    student = {"source": "zoo:mlp", "args": {"in_features": 64, "hidden": [16], "num_classes": 10}}
    stages = [{"name": "fit", "train": {"epochs": 3, "lr": 0.01}},
              {"name": "student", "distill": {"method": "features", "teacher": "fit", "student": student,
                                              "layers": {"layers.1": "layers.1"}, "epochs": 2, "lr": 0.01}}]
    fast = {"measure": {"latency": False}}
    one = write_pipeline(tmp_path, stages, name="one", **fast)
    for stage in stages:
        [kind] = [k for k in stage if k != "name"]
        stage[kind]["distributed"] = {"nproc": 2}
    two = write_pipeline(tmp_path, stages, name="two", **fast)
    for path in (one, two):
        PipelineRunner(validate(path), tracking_uri=store).run()
    for stage in ("fit", "student"):
        single, _ = _figures(store, "one", stage)
        double, curve = _figures(store, "two", stage)
        assert abs(single["accuracy"] - double["accuracy"]) < 0.05, (stage, single, double)
        assert double["train_processes"] == 2 and single["train_processes"] == 1
        assert double["train_samples_per_s"] > 0
        assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and curve  # one point an epoch
    assert double["accuracy"] > 0.5


def test_a_rank_that_fails_fails_the_stage_with_its_error(tmp_path, store):
    path = write_pipeline(tmp_path, [{"name": "fit", "train": {"epochs": 2, "lr": 1e30, "optimizer": "sgd",
                                                               "distributed": {"nproc": 2}}}],
                          measure={"latency": False})
    with pytest.raises(StageFailed) as raised:
        PipelineRunner(validate(path), tracking_uri=store).run()
    assert "diverged" in raised.value.message and "rank" in raised.value.message


def _joiner(endpoint: str, *args: str):
    """``compressflow join ENDPOINT`` in a process of its own: another machine's part."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "compressflow", "join", endpoint, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_machines_on_loopback_train_one_stage_and_its_machine_alone_logs(tmp_path, store):
    from tests.servers import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    spread = {"nproc": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "join_timeout_s": 120}
    path = write_pipeline(tmp_path, [{"name": "fit", "train": {"epochs": 2, "lr": 0.01,
                                                               "distributed": spread}}],
                          name="nodes", measure={"latency": False})
    joiner = _joiner(endpoint, "--nproc", "1", "--nnodes", "2", "--timeout", "120")
    try:
        PipelineRunner(validate(path), tracking_uri=store).run()
        out, err = joiner.communicate(timeout=120)
    finally:
        joiner.kill()
    assert joiner.returncode == 0, err
    assert "stage 1 of 1 trained here (1 processes)" in out
    figures, curve = _figures(store, "nodes", "fit")
    assert figures["train_processes"] == 2 and figures["accuracy"] > 0.5
    assert [m.step for m in curve] == [1, 2]


def test_machines_that_never_join_fail_the_stage_with_the_command_to_run(tmp_path, store):
    from tests.servers import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    spread = {"nproc": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "join_timeout_s": 2}
    path = write_pipeline(tmp_path, [{"name": "fit", "train": {"epochs": 1, "distributed": spread}}],
                          measure={"latency": False})
    with pytest.raises(StageFailed) as raised:
        PipelineRunner(validate(path), tracking_uri=store).run()
    assert f"did not meet at {endpoint} within 2 s" in raised.value.message
    assert f"compressflow join {endpoint} --nproc 1 --nnodes 2" in raised.value.hint


def test_several_machines_need_an_endpoint_and_join_checks_its_own():
    from pydantic import ValidationError

    from compressflow.distributed import join

    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        DistributedSpec(nproc=1, nnodes=2)
    assert DistributedSpec(nproc=3, nnodes=2, rdzv_endpoint="node0:29400").world == 6
    with pytest.raises(ValidationError):
        DistributedSpec(nnodes=2, rdzv_endpoint="http://node0")
    with pytest.raises(Exception, match="is not HOST:PORT"):
        join("node0", nproc=1, nnodes=2)
