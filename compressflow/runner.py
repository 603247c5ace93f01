"""Running a validated Plan: the input model first, then each stage, each measured and logged.

A stage gets a copy of the previous model, so every earlier model stays as it was (for
``ctx.model_at`` and for MLflow). A stage that raises leaves its run FAILED with the
traceback as ``error.txt``; everything logged before it stays. With ``reuse``, a stage whose
key (see :func:`compressflow.engine.stage_key`) was already logged in the experiment is not
run again: its model and figures are taken from that run, which a tag names.

The runner orders the work; building models and data (:mod:`compressflow.loading`),
measuring (:mod:`compressflow.measuring`), what the parent run records of the pipeline
(:mod:`compressflow.provenance`), the summary (:mod:`compressflow.summary`) and registration
(:mod:`compressflow.registration`) each have their own module.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from compressflow.engine import Plan, PlannedStage
from compressflow.errors import (CompressflowError, ConfigError, LoggingFailed, StageFailed,
                                 StoreUnreachable)
from compressflow.gates import GateFailed, gate_failures
from compressflow.interrupts import interrupts_deferred
from compressflow.loading import Loader
from compressflow.measuring import Evaluator, Measurer, compare_to_input, honesty_notes
from compressflow.provenance import log_pipeline_files, pipeline_params, pipeline_tags
from compressflow.registration import register_final
from compressflow.stage import PipelineContext, StageContext, StageResult
from compressflow.store import check_uri
from compressflow.summary import log_summary, summary_row
from compressflow.tracking import DEFAULT_URI, LoggedStage, Tag, Tracker, flatten

if TYPE_CHECKING:
    from torch import nn

INPUT = "input"


class PipelineRunner:
    """Runs one Plan into one MLflow parent run.

    ``resume``: continue the pipeline's latest unfinished parent run (same pipeline hash,
    same experiment) instead of opening one: its finished stages are kept, the rest run.
    ``reuse``: take a stage's result from an earlier run with the same key. ``keep_models``:
    keep every stage's model in memory (for a caller that inspects them after the run); by
    default a model is dropped once no later stage can ask for it (see :meth:`_release`).
    ``lock(key)``:
    held while a stage is looked up, computed and logged, so that parallel runs of a sweep
    compute each shared stage once. ``tags``/``params``: added to the parent run.
    """

    def __init__(self, plan: Plan, tracking_uri: str | None = None, experiment: str | None = None,
                 *, reuse: bool = False, lock: Callable[[str], ContextManager] | None = None,
                 tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 register: bool = True, run_name: str | None = None, resume: bool = False,
                 keep_models: bool = False):
        spec = plan.spec
        self.plan, self.spec, self.plugins, self.task = plan, spec, plan.plugins, plan.task
        self.uri = tracking_uri or spec.tracking.uri or DEFAULT_URI
        check_uri(self.uri)  # before the model and data are loaded
        self.experiment = experiment or spec.tracking.experiment or spec.name
        self.ctx = PipelineContext(spec, plan.file.path, self.uri, self.experiment)
        self.reuse, self.lock = reuse, lock or (lambda key: contextlib.nullcontext())
        self.extra_tags, self.extra_params = tags or {}, params or {}
        self.register_model = register and spec.registration is not None
        self.run_name = run_name or spec.name
        self.loader = Loader(plan, self.uri)
        self.models: dict[str, nn.Module] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="compressflow-"))
        self.tracker: Tracker | None = None
        self.evaluate: Evaluator | None = None
        self.measurer: Measurer | None = None
        self.reused: list[str] = []
        self.model_uris: dict[str, str | None] = {}
        self.resume = resume
        self.keep_models = keep_models
        self.kept: dict[str, LoggedStage] = {}  # resumed: the finished stages, by key

    # --- what stages may ask for ----------------------------------------------------------

    def model_at(self, ref: str, current: str) -> nn.Module:
        """A copy of the model after stage ``ref`` (``previous``: the one before ``current``)."""
        names = list(self.models)
        if ref == "previous":
            ref = names[-1]
        if ref not in self.models:
            raise ConfigError(f"stage '{current}': no model '{ref}' yet", f"known: {', '.join(names)}")
        if self.models[ref] is None:  # dropped: validation saw no later stage name it
            raise StageFailed(f"stage '{current}': the model of '{ref}' is no longer held in memory",
                              f"name '{ref}' in the stage's params (a StageRef field) so that it is kept")
        return copy.deepcopy(self.models[ref])

    # --- the run --------------------------------------------------------------------------

    def run(self) -> PipelineContext:
        """Preflight (input model and data, exit 2 on failure), then every stage in order."""
        import torch

        torch.manual_seed(self.spec.seed)
        self._preflight()
        self.tracker = Tracker(self.uri, self.experiment, self.spec.tracking.log_models,
                               self.spec.tracking.artifacts)
        self._open_parent()
        self.plugins.pipeline_start(self.ctx)
        status, in_flight = "FAILED", None
        try:
            self._run_input()
            for planned in self.plan.stages:
                self._run_stage(planned)
            status = "FINISHED"
            if self.register_model:
                register_final(self.tracker, self.spec.registration, self._final_model_uri())
        except BaseException as error:
            in_flight = error
            status = "FAILED" if isinstance(error, Exception) else "KILLED"
            raise
        finally:
            self._finish(status, in_flight)
        return self.ctx

    def _finish(self, status: str, in_flight: BaseException | None) -> None:
        """The summary, then the parent's status: always the pipeline's outcome.

        Signals wait until both are written. A failure to log (a full disk, say) touches
        nothing already logged; it is one message, raised unless another error is already
        on its way out, which it must not replace.
        """
        failures: list[str] = []
        if isinstance(in_flight, StoreUnreachable):  # nothing can be written; the runs stay open
            self.plugins.pipeline_end(self.ctx, status)
            return
        with interrupts_deferred():
            try:
                log_summary(self.tracker, self.ctx, self.spec.evaluation.metric, self.workdir,
                            self._final_model_uri())
            except Exception as error:
                failures.append(f"the summary: {type(error).__name__}: {error}")
            try:
                self.tracker.end_pipeline(status)
            except Exception as error:
                failures.append(f"the parent's status {status}: {type(error).__name__}: {error}")
            self.plugins.pipeline_end(self.ctx, status)
        if not failures:
            return
        failed = LoggingFailed(
            f"pipeline '{self.spec.name}' ended {status}, but logging {'; '.join(failures)} "
            f"failed (run {self.ctx.run_id} in {self.uri})",
            "free space or fix the store's permissions; every stage logged before stays as it is")
        if in_flight is None:
            raise failed
        print(f"warning: {failed.message}", file=sys.stderr)

    def _open_parent(self) -> None:
        """A new parent run, or with ``resume`` the pipeline's latest unfinished one, whose
        finished stages are kept as they are."""
        tags = {**pipeline_tags(self.plan), **self.extra_tags}
        unfinished = self.tracker.unfinished_pipeline(tags[Tag.PIPELINE_HASH]) if self.resume else None
        if unfinished is not None:
            self.ctx.run_id = self.tracker.resume_pipeline(unfinished)
            self.kept = self.tracker.finished_stages(unfinished)
            return
        if self.resume:
            print(f"resume: no unfinished run of this pipeline in experiment "
                  f"'{self.experiment}'; starting a new one", file=sys.stderr)
        self.ctx.run_id = self.tracker.start_pipeline(
            self.run_name, tags, {**pipeline_params(self.plan), **self.extra_params})
        log_pipeline_files(self.tracker, self.plan)

    def _keep(self, name: str, method: str, found: LoggedStage) -> None:
        """A stage the interrupted attempt finished: its model and figures, as logged."""
        result = StageResult(model=self.tracker.load_model(found.model_uri), metrics=found.metrics,
                             notes=[f"kept from the interrupted attempt (run {found.run_id})"])
        self.model_uris[name] = found.model_uri
        self.reused.append(name)
        self._record(name, method, result)
        if found.gate_failed:  # it failed with on_fail: continue, or the run would have stopped
            self.ctx.gate_failures.append(name)
            self.ctx.summary[-1]["notes"] += "; gate failed (see its run's gate.txt)"

    def _preflight(self) -> None:
        """Build the input model and every stage's data: bad input is found before any run."""
        model = self.loader.build_model(self.spec.model, self.plan.file.place(("model",)))
        self.models[INPUT] = self.loader.input_model = model
        for planned in self.plan.stages:
            self.loader.data_for(planned.data)
        bundle = self.loader.data_for(self.spec.data)
        self.evaluate = Evaluator(self.task, self.plugins.metrics, self.spec.evaluation.extra,
                                  bundle.val, model)
        self.measurer = Measurer(self.task, self.spec.measure, bundle)
        try:
            self.measurer.example(1)
            self.task.evaluate(model, [next(iter(bundle.val))],
                               model if self.task.uses_reference else None)
        except CompressflowError:
            raise
        except Exception as error:
            raise ConfigError(
                f"{self.plan.file.place(('model',))}: the input model cannot run on the data "
                f"under task '{self.task.name}': {type(error).__name__}: {error}",
                "check that the dataset yields what the model takes (task, data.args, "
                "data.shape); COMPRESSFLOW_DEBUG=1 shows the traceback") from error

    def _final_model_uri(self) -> str | None:
        return self.model_uris.get(list(self.ctx.results)[-1]) if self.ctx.results else None

    def cleanup(self) -> None:
        """Remove the stages' work folders (their files are logged; results still name them)."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_data(self, data_spec) -> None:
        info = self.loader.data_for(data_spec).info
        evaluated = self.loader.data_for(self.spec.data).info
        if info == evaluated:  # MLflow keeps one input per dataset: name both uses
            self.tracker.log_dataset(info, "train+eval")
        else:
            self.tracker.log_dataset(info, "train")
            self.tracker.log_dataset(evaluated, "eval")

    def _run_input(self) -> None:
        if self.plan.input_key in self.kept:
            self._keep(INPUT, "input", self.kept[self.plan.input_key])
            return
        params = flatten("model", self.spec.model.model_dump(mode="json"))
        with self.lock(self.plan.input_key):
            found = self._find(self.plan.input_key)
            self.tracker.start_stage(INPUT, params, self._stage_tags("input", self.plan.input_key, found))
            try:
                self.tracker.log_dataset(self.loader.data_for(self.spec.data).info, "eval")
                result = self._reused(found) if found else StageResult(model=self.models[INPUT])
                self._measure_and_log(INPUT, "input", result, found)
            except BaseException:
                self.tracker.log_text(traceback.format_exc(), "error.txt")
                self.tracker.end_stage("FAILED")
                raise
        self.tracker.end_stage()

    def _find(self, key: str) -> LoggedStage | None:
        return self.tracker.find_stage(key) if self.reuse else None

    def _stage_tags(self, kind: str, key: str, found: LoggedStage | None) -> dict[str, str]:
        tags = {Tag.KIND: kind, Tag.STAGE_KEY: key}
        if found:
            tags[Tag.REUSED_FROM] = found.run_id
        return tags

    def _reused(self, found: LoggedStage) -> StageResult:
        return StageResult(model=self.tracker.load_model(found.model_uri), metrics=found.metrics,
                           notes=[f"reused run {found.run_id}: same input, params, plugin and data"])

    def _stage_context(self, planned: PlannedStage) -> StageContext:
        name = planned.entry.name
        stage = planned.stage
        return StageContext(
            name=name,
            seed=self.spec.seed + planned.entry.index + 1,
            workdir=Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)),
            metric=self.spec.evaluation.metric,
            data=lambda: self.loader.data_for(planned.data),
            evaluate=self.evaluate,
            model_at=lambda ref: self.model_at(ref, name),
            build_model=lambda spec: self.loader.build_model(spec, f"stage '{name}'"),
            log_metric=self.tracker.log_metric,
            log_metrics=self.tracker.log_metrics,
            progress=lambda step, total, figures: self.plugins.stage_progress(
                stage, step, total, figures),
            task=self.task,
        )

    def _run_stage(self, planned: PlannedStage) -> None:
        stage, entry = planned.stage, planned.entry
        if planned.key in self.kept:
            found = self.kept[planned.key]
            self._keep(entry.name, f"{stage.kind}/{stage.method}", found)
            if found.gate_failed and entry.gate.on_fail == "stop":  # as the first attempt did
                raise GateFailed(
                    f"stage '{entry.name}' failed its gate against '{entry.gate.against}' "
                    f"(run {found.run_id}, kept from the earlier attempt)",
                    "the pipeline stops here again (exit 3); see that run's gate.txt")
            return
        params = flatten("", stage.params.model_dump(mode="json"))
        params.update(flatten("data", entry.data or {}))
        previous = list(self.models)[-1]
        with self.lock(planned.key):
            found = self._find(planned.key)
            tags = {**self._stage_tags(stage.kind, planned.key, found),
                    Tag.METHOD: stage.method, Tag.PLUGIN: str(planned.provider)}
            self.tracker.start_stage(entry.name, params, tags)
            self.plugins.stage_start(stage, self.ctx)
            try:
                self._log_data(planned.data)
                result = self._reused(found) if found else self._compute(planned, previous)
                self._measure_and_log(entry.name, f"{stage.kind}/{stage.method}", result, found)
            except BaseException as error:
                self._fail(planned, error)
        failures = self._check_gate(planned, previous)
        self.tracker.end_stage()
        self.plugins.stage_end(stage, result, self.ctx)
        if failures and entry.gate.on_fail == "stop":
            raise GateFailed(
                f"stage '{entry.name}' failed its gate against '{entry.gate.against}': "
                + "; ".join(failures),
                "the pipeline stopped here (exit 3); every run so far is logged. "
                "Use `gate: {on_fail: continue}` to record and go on")

    def _compute(self, planned: PlannedStage, previous: str) -> StageResult:
        import torch

        stage_ctx = self._stage_context(planned)
        # the stage's own randomness, from its seed alone: equal keys, equal work, whether
        # earlier stages ran here, were reused or were resumed
        torch.manual_seed(stage_ctx.seed)
        self.loader.data_for(planned.data).reseed(stage_ctx.seed)
        result = planned.stage.run(copy.deepcopy(self.models[previous]), stage_ctx)
        if not isinstance(result, StageResult):
            raise TypeError(f"run() returned {type(result).__name__}, not a StageResult")
        return result

    def _fail(self, planned: PlannedStage, error: BaseException) -> None:
        stage, entry = planned.stage, planned.entry
        if isinstance(error, StoreUnreachable):  # the server is gone: tell, write nothing
            self.plugins.stage_error(stage, error, self.ctx)
            raise error
        self.tracker.log_text(traceback.format_exc(), "error.txt")
        self.tracker.end_stage("FAILED" if isinstance(error, Exception) else "KILLED")
        self.plugins.stage_error(stage, error, self.ctx)
        if not isinstance(error, Exception):
            raise error
        # a stage failing at run time exits 1, even when it blames its input
        cause = error.message if isinstance(error, CompressflowError) else f"{type(error).__name__}: {error}"
        hint = f"{error.hint}; " if isinstance(error, CompressflowError) and error.hint else ""
        raise StageFailed(
            f"stage '{entry.name}' ({stage.kind}/{stage.method}, {planned.provider}) failed: {cause}",
            f"{hint}its MLflow run {self.tracker.last_stage_id} is FAILED with error.txt; every "
            "earlier stage's run and model is kept. COMPRESSFLOW_DEBUG=1 shows the traceback",
        ) from error

    def _check_gate(self, planned: PlannedStage, previous: str) -> list[str]:
        gate = planned.entry.gate
        if gate is None:
            return []
        against = previous if gate.against == "previous" else gate.against
        metric = self.spec.evaluation.metric
        failures = gate_failures(gate, self.ctx.results[planned.entry.name].metrics,
                                 self.ctx.results[against].metrics, metric,
                                 self.plan.higher_is_better(metric))
        self.tracker.set_tags({Tag.GATE: "failed" if failures else "passed"})
        if failures:
            self.tracker.log_text("\n".join(failures) + "\n", "gate.txt")
            self.ctx.gate_failures.append(planned.entry.name)
            self.ctx.summary[-1]["notes"] += " gate failed: " + "; ".join(failures)
        return failures

    def _measure_and_log(self, name: str, method: str, result: StageResult,
                         found: LoggedStage | None) -> None:
        if found:
            # reused: the figures were measured when that run computed this very model
            self.tracker.log_metrics(result.metrics)
            self.tracker.set_tags({Tag.MODEL_URI: found.model_uri})
            self.model_uris[name] = found.model_uri
            self.reused.append(name)
        else:
            result.metrics = self._figures(name, result)
            self.tracker.log_metrics(result.metrics)
            self.model_uris[name] = self.tracker.log_model(
                result.model, self.measurer.example(1, self.measurer.lengths[0]), self.task.feed)
            for artifact in result.artifacts.values():
                self.tracker.log_file(Path(artifact))
        if result.notes:
            self.tracker.log_text("\n".join(result.notes) + "\n", "notes.txt")
        self._record(name, method, result)

    def _record(self, name: str, method: str, result: StageResult) -> None:
        """The stage's model and result for later stages, and its summary row."""
        self.models[name] = result.model
        self.ctx.results[name] = result
        self.ctx.summary.append(summary_row(name, method, result, self.spec.evaluation.metric,
                                            name in self.reused, self.spec.measure.batch_sizes[0]))
        if not self.keep_models:
            self._release(name)

    def _release(self, done: str) -> None:
        """Drop the models no later stage can ask for: all but the input model (the reference
        every stage is measured against), the newest (the next stage's input) and those a
        later stage names (a distillation teacher). An LLM stage's model is hundreds of MB:
        keeping every one does not scale. A dropped model stays in MLflow (``model_at``
        says so); its figures stay in ``ctx.results``."""
        names = [p.entry.name for p in self.plan.stages]
        later = self.plan.stages[names.index(done) + 1:] if done in names else self.plan.stages
        wanted = {INPUT, done} | {ref for p in later for ref in p.stage.params.stage_refs().values()}
        for name, model in self.models.items():
            if model is not None and name not in wanted:
                self.models[name] = None
                self.ctx.results[name].model = None

    def _figures(self, name: str, result: StageResult) -> dict[str, float]:
        """Everything measured of a freshly computed model, then the stage's own figures."""
        is_input = name == INPUT
        if result.packed_bytes is None and "compressed_bytes" in result.metrics:
            # a plugin written before StageResult.packed_bytes reported it as a metric
            result.packed_bytes = int(result.metrics.pop("compressed_bytes"))
        figures = self.evaluate(result.model)
        figures.update(self.measurer.figures(result.model, None if is_input else self.models[INPUT]))
        if not is_input:
            start = self.ctx.results[INPUT].metrics
            figures.update(compare_to_input(figures, start, self.spec.evaluation.metric,
                                            result.packed_bytes))
            before = list(self.ctx.results.values())[-1].metrics
            result.notes += honesty_notes(figures, before, self.spec.measure.batch_sizes,
                                          self.measurer.lengths)
        clashes = sorted(set(result.metrics) & set(figures))
        if clashes:
            raise ValueError(
                f"the stage's own metrics {', '.join(clashes)} collide with figures the engine "
                "measures; a stage reports a packed file as StageResult.packed_bytes and "
                "names its other figures apart (e.g. final_<name>)")
        return {**figures, **result.metrics}
