"""What the parent run records of the pipeline itself: tags, params, the file as written and
as resolved, so that any run can be traced back to exactly what produced it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from compressflow.tracking import Tag, git_commit

if TYPE_CHECKING:
    from compressflow.engine import Plan
    from compressflow.tracking import Tracker


def pipeline_tags(plan: Plan) -> dict[str, str]:
    """The pipeline's hash and file, compressflow's version, the task, the git commit."""
    import compressflow

    path = plan.file.path
    tags = {
        Tag.PIPELINE_HASH: plan.file.content_hash(),
        Tag.VERSION: compressflow.__version__,
        Tag.PIPELINE_FILE: str(path),
        Tag.TASK: plan.task.name,
        # what `compressflow compare` ranks by, unless told otherwise
        Tag.METRIC: spec_metric(plan),
        Tag.HIGHER_IS_BETTER: str(plan.higher_is_better(spec_metric(plan))).lower(),
        # the UI's Source column: the pipeline file, not the python module that ran it
        Tag.SOURCE_NAME: str(path.resolve()),
        Tag.SOURCE_TYPE: "LOCAL",
    }
    commit = git_commit(path.resolve().parent)
    if commit:
        tags[Tag.GIT_COMMIT] = commit
    return tags


def spec_metric(plan: Plan) -> str:
    """The pipeline's headline metric (validation filled in the task's default)."""
    return plan.spec.evaluation.metric


def pipeline_params(plan: Plan) -> dict[str, Any]:
    """Seed, model source, dataset, task and the chain of stages."""
    spec = plan.spec
    return {
        "seed": spec.seed,
        "model.source": spec.model.source,
        "data.dataset": spec.data.dataset,
        "task": plan.task.name,
        "stages": " -> ".join(f"{p.entry.name}:{p.stage.kind}/{p.stage.method}" for p in plan.stages),
    }


def log_pipeline_files(tracker: Tracker, plan: Plan) -> None:
    """``pipeline.yaml`` as written and ``pipeline.resolved.yaml``: every stage's params in full."""
    resolved = {k: v for k, v in plan.file.raw.items() if k != "sweep"}
    resolved["stages"] = [
        {"name": p.entry.name, p.stage.kind: {"method": p.stage.method,
                                             **p.stage.params.model_dump(mode="json")},
         **({"data": p.entry.data} if p.entry.data else {}),
         **({"gate": p.entry.gate.model_dump(mode="json")} if p.entry.gate else {})}
        for p in plan.stages
    ]
    tracker.log_text(plan.file.text, "pipeline.yaml")
    tracker.log_text(yaml.safe_dump(resolved, sort_keys=False), "pipeline.resolved.yaml")
