"""Built-in tasks: classification (the default), regression, embedding and causal-lm.

Each is an ordinary plugin registration (``register_tasks``); the core names none of them
except ``classification`` as the default of a pipeline that names no task.
"""

from __future__ import annotations

import math

from compressflow import hookimpl
from compressflow.task import Task, TaskMetric


class Classification(Task):
    """Targets are class indices; the model's prediction is one logit per class."""

    name = "classification"
    default_metric = "accuracy"
    metrics = {
        "accuracy": TaskMetric(True, description="share of samples whose argmax is the label"),
        "loss": TaskMetric(False, description="mean cross-entropy over samples"),
    }

    def loss(self, outputs, targets, reference=None):
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets)

    def score(self, outputs, targets, reference):
        import torch.nn.functional as F

        return {"accuracy": (outputs.argmax(dim=1) == targets).double(),
                "loss": F.cross_entropy(outputs.double(), targets, reduction="none")}


class Regression(Task):
    """Float targets, as many per sample as the model has outputs."""

    name = "regression"
    default_metric = "mse"
    metrics = {
        "mse": TaskMetric(False, description="mean squared error over every target value"),
        "mae": TaskMetric(False, description="mean absolute error over every target value"),
    }

    def loss(self, outputs, targets, reference=None):
        import torch.nn.functional as F

        return F.mse_loss(outputs.reshape(targets.shape), targets.to(outputs.dtype))

    def score(self, outputs, targets, reference):
        error = outputs.double().reshape(targets.shape) - targets.double()
        return {"mse": error.pow(2), "mae": error.abs()}


class Embedding(Task):
    """Fidelity of the model's embeddings to the pipeline's input model, on the same inputs.

    ``cosine_mean``/``cosine_min``: cosine of each sample's embedding to the input model's.
    ``spearman``: Spearman's rho between the pairwise cosine similarities of the samples
    under the model and under the input model (the first 2,000 evaluated samples). Targets
    are ignored: the input model is the reference, never the labels. Training stages
    minimize ``1 - cosine`` to the reference (the input model, or a teacher).
    """

    name = "embedding"
    default_metric = "cosine_mean"
    uses_reference = True
    metrics = {
        "cosine_mean": TaskMetric(True, description="mean cosine to the input model's embeddings"),
        "cosine_min": TaskMetric(True, "min", description="lowest cosine to the input model's"),
        "spearman": TaskMetric(True, description="rank correlation of pairwise similarities"),
    }
    pairs_limit = 2000

    def loss(self, outputs, targets, reference=None):
        import torch.nn.functional as F

        if reference is None:
            raise ValueError("the embedding task learns to match a reference model's embeddings")
        return (1 - F.cosine_similarity(outputs.float(), reference.float(), dim=-1)).mean()

    def evaluate(self, model, loader, reference=None):
        import torch

        if reference is None:
            raise ValueError("the embedding task needs the input model as reference")
        ours, theirs = [], []
        model.eval(), reference.eval()
        with torch.inference_mode():
            for batch in loader:
                inputs, _ = self.split(batch)
                ours.append(self.predict(model, inputs).double().flatten(1))
                theirs.append(self.predict(reference, inputs).double().flatten(1))
        ours, theirs = torch.cat(ours), torch.cat(theirs)
        cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                "spearman": pairwise_spearman(ours[: self.pairs_limit], theirs[: self.pairs_limit])}


def pairwise_spearman(a, b) -> float:
    """Spearman's rho between the upper-triangle cosine similarities of rows of ``a`` and ``b``."""
    from scipy.stats import spearmanr
    import torch.nn.functional as F

    if len(a) < 3:
        return float("nan")
    rows, cols = torch_triu(len(a))
    sim_a = (F.normalize(a, dim=1) @ F.normalize(a, dim=1).T)[rows, cols]
    sim_b = (F.normalize(b, dim=1) @ F.normalize(b, dim=1).T)[rows, cols]
    return float(spearmanr(sim_a.numpy(), sim_b.numpy()).statistic)


def torch_triu(n: int):
    """Row and column indices of the strict upper triangle of an n x n matrix."""
    import torch

    index = torch.triu_indices(n, n, offset=1)
    return index[0], index[1]


class CausalLM(Task):
    """Next-token prediction; ``perplexity`` is exp of the mean NLL over the scored tokens.

    A batch is a dict with ``input_ids`` (and ``attention_mask``); its ``labels``, where the
    dataset gives them, mark with -100 the tokens not to score (the context a strided window
    repeats from the one before), else every attended token but the first is scored.
    """

    name = "causal-lm"
    default_metric = "perplexity"
    metrics = {"perplexity": TaskMetric(False, finish=math.exp,
                                        description="exp(mean token NLL) over the windows")}

    def split(self, batch):
        inputs, labels = super().split(batch)
        if labels is None and isinstance(inputs, dict):
            labels = inputs["input_ids"].clone()
            if "attention_mask" in inputs:
                labels[inputs["attention_mask"] == 0] = -100
        return inputs, labels

    def token_nll(self, outputs, labels):
        """NLL of each scored token (logits at t predict the label at t + 1)."""
        import torch.nn.functional as F

        logits, shifted = outputs[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                              ignore_index=-100, reduction="none")
        return nll[shifted.reshape(-1) != -100]

    def loss(self, outputs, targets, reference=None):
        return self.token_nll(outputs, targets).mean()

    def score(self, outputs, targets, reference):
        return {"perplexity": self.token_nll(outputs, targets)}

    def phases(self, model, inputs):
        """``prefill``: the prompt's forward pass, per prompt token; ``decode``: one next-token
        step on the prompt's key/value cache, which is cut back after every step so that
        each timed step is the same. Only for a model with ``prefill(inputs) -> state`` and
        ``decode(state)`` (``hf:`` causal LMs); a model without (an ONNX graph) has none."""
        if not (callable(getattr(model, "prefill", None)) and callable(getattr(model, "decode", None))):
            return {}
        import torch

        tokens = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            state = model.prefill(inputs)
        return {"prefill": (lambda: self.feed(model, inputs), tokens),
                "decode": (lambda: model.decode(state), 1)}


def accuracy(model, loader) -> float:
    """Classification accuracy of ``model`` over ``loader``, for scripts and benchmarks."""
    return Classification().evaluate(model, loader)["accuracy"]


def loss(model, loader) -> float:
    """Mean cross-entropy of ``model`` over ``loader``, for scripts and benchmarks."""
    return Classification().evaluate(model, loader)["loss"]


@hookimpl
def register_tasks(registry) -> None:
    """classification, regression, embedding and causal-lm."""
    for task in (Classification, Regression, Embedding, CausalLM):
        registry.add(task)
