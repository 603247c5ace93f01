"""The task: how a batch feeds a model, what training minimizes, and how a model is judged.

A pipeline names its task (``task: classification``, the default). Everything that runs a
model goes through it: the training loop, calibration, evaluation, measuring and the MLflow
signature, so that no line of the core assumes ``model(x)`` on one tensor. A task is
registered by a plugin (``register_tasks``) like a stage; see docs/architecture.md.

What a loader yields, the batch, is one of:

- ``(inputs, targets)``: ``inputs`` a tensor, a tuple of tensors (``model(*inputs)``) or a
  dict of tensors (``model(**inputs)``, a tokenizer's ``input_ids``/``attention_mask``);
  ``targets`` a tensor, or ``None`` where the task needs none;
- a dict of tensors alone, Hugging Face style: its ``labels`` (if any) are the targets and
  the rest the inputs.

Nothing here imports torch at module level, so the CLI can validate without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_TASK = "classification"
"""The task of a pipeline that names none: every pipeline written before tasks existed."""

Inputs = Any
"""A tensor, a tuple of tensors or a dict of tensors: what a model is called with."""


@dataclass(frozen=True)
class TaskMetric:
    """One figure a task measures.

    Attributes:
        higher_is_better: which way is better (gates, Pareto fronts and summaries use it).
        reduce: how per-sample values from :meth:`Task.score` become one figure.
        finish: applied after reducing (perplexity: ``exp`` of the mean token NLL).
        description: one line for ``compressflow plugins``.
    """

    higher_is_better: bool = True
    reduce: Literal["mean", "min", "max"] = "mean"
    finish: Callable[[float], float] | None = None
    description: str = ""


class TaskParams(BaseModel):
    """Base of a task's settings (``task: {name: causal-lm, window: 512}``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- inputs of any shape ------------------------------------------------------------------


def call(model: Callable, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def call_args(inputs: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that :func:`call` passes (for ``torch.func.functional_call``)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def batch_len(inputs: Inputs) -> int:
    """Samples in ``inputs``: the first dimension of its first tensor."""
    if isinstance(inputs, Mapping):
        return batch_len(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)):
        return batch_len(inputs[0])
    return int(inputs.shape[0])


def map_inputs(fn: Callable[[Any], Any], inputs: Inputs) -> Inputs:
    """``fn`` applied to every tensor of ``inputs``, its structure kept."""
    if isinstance(inputs, Mapping):
        return {key: map_inputs(fn, value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_inputs(fn, value) for value in inputs)
    return fn(inputs) if hasattr(inputs, "shape") else inputs


def take(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of ``inputs``."""
    return map_inputs(lambda t: t[start:stop], inputs)


def concat(parts: list[Inputs]) -> Inputs:
    """Batches joined along the first dimension (sequences padded to the longest with 0)."""
    import torch

    first = parts[0]
    if isinstance(first, Mapping):
        return {key: concat([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat([part[i] for part in parts]) for i in range(len(first)))
    if first.dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
        longest = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, longest - p.shape[1])) if p.dim() == 2 else p
                 for p in parts]
    return torch.cat(parts)


def to_numpy(value: Any) -> Any:
    """Tensors (in a dict, tuple or model output) as numpy arrays, for signatures."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if isinstance(value, Mapping) or hasattr(value, "to_tuple"):
        return {key: to_numpy(item) for key, item in dict(value).items() if hasattr(item, "detach")}
    if isinstance(value, (tuple, list)):
        return to_numpy(value[0])
    return value


# --- the task -----------------------------------------------------------------------------


class Task:
    """Base of every task: how to split a batch, feed a model, compute its loss and metrics.

    A subclass sets ``name``, ``metrics`` (name -> :class:`TaskMetric`), ``default_metric``
    and writes :meth:`loss` and :meth:`score`; it may override :meth:`evaluate` entirely when
    its figures are not means over samples. ``uses_reference``: the metrics compare the
    model with the pipeline's *input* model on the same batch (fidelity), so evaluation gets
    that model as ``reference``.
    """

    name: ClassVar[str]
    metrics: ClassVar[dict[str, TaskMetric]] = {}
    default_metric: ClassVar[str]
    uses_reference: ClassVar[bool] = False
    Params: ClassVar[type[TaskParams]] = TaskParams

    def __init__(self, params: TaskParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    # batches and models

    def split(self, batch: Any) -> tuple[Inputs, Any]:
        """``(inputs, targets)`` of a batch (see the module docstring for the forms)."""
        if isinstance(batch, Mapping):
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            return inputs, batch.get("labels")
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        return batch, None

    def feed(self, model: Callable, inputs: Inputs) -> Any:
        """The model's raw outputs on ``inputs`` (see :func:`call`)."""
        return call(model, inputs)

    def prediction(self, outputs: Any) -> torch.Tensor:
        """The one tensor losses and metrics use from raw outputs: a tensor as it is; of a
        dict or model output its ``logits`` (else its first tensor); of a tuple its first."""
        if hasattr(outputs, "shape"):
            return outputs
        if isinstance(outputs, Mapping) or hasattr(outputs, "to_tuple"):
            found = dict(outputs)
            for key in ("logits", "sentence_embedding", "embeddings", "last_hidden_state"):
                if key in found:
                    return found[key]
            return next(v for v in found.values() if hasattr(v, "shape"))
        return outputs[0]

    def predict(self, model: Callable, inputs: Inputs) -> torch.Tensor:
        """``prediction(feed(model, inputs))``."""
        return self.prediction(self.feed(model, inputs))

    # what training minimizes and evaluation reports

    def loss(self, outputs: torch.Tensor, targets: Any, reference: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The scalar a training stage minimizes, from :meth:`prediction` outputs.

        :param outputs: the model's prediction on the batch.
        :param targets: the batch's targets (None where the task has none).
        :param reference: the input model's (or a teacher's) prediction on the same batch,
            for tasks that learn to match a model rather than labels.
        """
        raise NotImplementedError(f"task '{self.name}' defines no training loss")

    def score(self, outputs: torch.Tensor, targets: Any, reference: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
        """Per-sample values of each metric on one batch; :meth:`evaluate` reduces them."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: Iterable, reference: nn.Module | None = None
                 ) -> dict[str, float]:
        """Every metric of the task over ``loader``, the model in eval mode, no gradients."""
        import torch

        values: dict[str, list[torch.Tensor]] = {}
        model.eval()
        if reference is not None:
            reference.eval()
        with torch.inference_mode():
            for batch in loader:
                inputs, targets = self.split(batch)
                expected = self.predict(reference, inputs) if reference is not None else None
                for name, value in self.score(self.predict(model, inputs), targets, expected).items():
                    values.setdefault(name, []).append(value.detach().double().flatten())
        return {name: reduce(self.metrics[name], torch.cat(parts)) for name, parts in values.items()}

    # example inputs for signatures, MACs and latency

    def examples(self, loader: Iterable, batch_size: int, seq_len: int | None = None) -> Inputs:
        """``batch_size`` real inputs from ``loader`` (repeated when it holds fewer); with
        ``seq_len``, every 2-D tensor (tokens) is cut or tiled to that many positions."""
        import torch

        parts, seen = [], 0
        for batch in loader:
            inputs, _ = self.split(batch)
            parts.append(inputs)
            seen += batch_len(inputs)
            if seen >= batch_size:
                break
        if not parts:
            raise ValueError("the loader yields no batches: no example inputs")
        joined = concat(parts)
        while batch_len(joined) < batch_size:
            joined = concat([joined, joined])
        joined = take(joined, 0, batch_size)
        if seq_len is not None:
            def fit_length(t):
                if t.dim() != 2:
                    return t
                repeats = -(-seq_len // t.shape[1])
                return torch.cat([t] * repeats, dim=1)[:, :seq_len]
            joined = map_inputs(fit_length, joined)
        return joined

    def token_lengths(self, loader: Iterable) -> list[int]:
        """Tokens of every sample of ``loader`` (its attention mask's ones, else its 2-D
        integer tensor's width); empty when the inputs are not tokens."""
        lengths: list[int] = []
        for batch in loader:
            inputs, _ = self.split(batch)
            if not isinstance(inputs, Mapping):
                return []
            mask = inputs.get("attention_mask")
            if mask is None:
                ids = next((t for t in inputs.values() if t.dim() == 2 and not t.is_floating_point()), None)
                if ids is None:
                    return []
                lengths += [ids.shape[1]] * ids.shape[0]
            else:
                lengths += [int(n) for n in mask.sum(dim=1)]
        return lengths

    def phases(self, model: Callable, inputs: Inputs) -> dict[str, tuple[Callable[[], Any], int]]:
        """Timed phases besides the whole forward pass: ``{name: (call, tokens)}``, each call
        timed interleaved with the input model's and reported per token
        (``latency_ms_per_token_<name>``, ``<name>_speedup``). None by default; causal-lm
        has ``prefill`` and ``decode`` where the model can keep a key/value cache. ``inputs``:
        one example batch (batch 1) at the first timed length; preparing a call (a prefill
        before the decode step it times) happens here, untimed."""
        return {}

    def describe(self) -> str:
        """One line for listings: the task's metrics and which way is better."""
        return ", ".join(f"{n} ({'higher' if m.higher_is_better else 'lower'} is better)"
                         for n, m in self.metrics.items())


def reduce(metric: TaskMetric, values: torch.Tensor) -> float:
    """One figure from per-sample values, as ``metric`` says."""
    if values.numel() == 0:
        return float("nan")
    value = float({"mean": values.mean, "min": values.min, "max": values.max}[metric.reduce]())
    return metric.finish(value) if metric.finish else value


def default_task() -> Task:
    """The default task (classification) as the plugins register it, for contexts built
    outside a pipeline (benchmarks, tests)."""
    from compressflow.plugins import load_plugins

    return load_plugins().tasks.get(DEFAULT_TASK)()
