"""compressflow_tasks: each built-in task's metrics give the exact numbers, over samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressflow_tasks import CausalLM, Classification, Embedding, Regression, pairwise_spearman

# The model returns its input, so each row below IS the logits of one sample.
LOGITS = [
    [2.0, 0.0, 0.0],   # target 0: right
    [0.0, 1.0, 0.0],   # target 1: right
    [0.0, 0.0, 3.0],   # target 2: right
    [1.0, 2.0, 0.0],   # target 0: wrong
    [0.0, 0.0, 1.0],   # target 1: wrong
]
TARGETS = [0, 1, 2, 0, 1]


def _loader(batch_size: int) -> DataLoader:
    data = TensorDataset(torch.tensor(LOGITS), torch.tensor(TARGETS))
    return DataLoader(data, batch_size=batch_size)


def _cross_entropy(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_accuracy_and_loss_are_means_over_samples(batch_size):
    # batches of 2 are right 2/2, 1/2, 0/1: a mean over batches would say 0.5, not 3/5
    figures = Classification().evaluate(nn.Identity(), _loader(batch_size))
    assert figures["accuracy"] == pytest.approx(3 / 5, abs=1e-12)
    expected = sum(_cross_entropy(r, t) for r, t in zip(LOGITS, TARGETS)) / len(TARGETS)
    assert figures["loss"] == pytest.approx(expected, rel=1e-9)


def test_regression_mse_and_mae_over_every_value():
    outputs = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    targets = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    figures = Regression().evaluate(nn.Identity(), [(outputs, targets)])
    assert figures == {"mse": pytest.approx(5 / 4), "mae": pytest.approx(3 / 4)}
    assert float(Regression().loss(outputs, targets)) == pytest.approx(5 / 4)


class _Scaled(nn.Module):
    """Embeds a dict batch: the mean of token vectors, optionally rotated away."""

    def __init__(self, turn: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(20, 4)
        self.turn = turn

    def forward(self, input_ids, attention_mask):
        vectors = (self.table(input_ids) * attention_mask.unsqueeze(-1)).sum(1)
        noise = torch.linspace(-1, 1, vectors.numel()).reshape(vectors.shape)
        return {"sentence_embedding": vectors + self.turn * noise}


def _text_batches():
    ids = torch.randint(1, 20, (12, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    return [{"input_ids": ids[:6], "attention_mask": mask[:6]},
            {"input_ids": ids[6:], "attention_mask": mask[6:]}]


def test_embedding_fidelity_is_against_the_reference_model_not_labels():
    reference = _Scaled()
    same = Embedding().evaluate(_Scaled(), _text_batches(), reference)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["cosine_min"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    moved = Embedding().evaluate(_Scaled(turn=3.0), _text_batches(), reference)
    # cosines computed by hand over all 12 samples
    with torch.no_grad():
        ours = torch.cat([_Scaled(turn=3.0)(**b)["sentence_embedding"] for b in _text_batches()])
        theirs = torch.cat([reference(**b)["sentence_embedding"] for b in _text_batches()])
    cosine = torch.nn.functional.cosine_similarity(ours.double(), theirs.double())
    assert moved["cosine_mean"] == pytest.approx(float(cosine.mean()))
    assert moved["cosine_min"] == pytest.approx(float(cosine.min()))
    assert moved["cosine_min"] < moved["cosine_mean"] < 1
    with pytest.raises(ValueError, match="input model as reference"):
        Embedding().evaluate(_Scaled(), _text_batches(), None)


def test_pairwise_spearman_is_rank_correlation_of_similarities():
    a = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).double()
    assert pairwise_spearman(a, a * 3) == pytest.approx(1.0)  # scale changes no cosine
    assert pairwise_spearman(a, torch.randn(10, 4).double()) < 0.9


class _Bigram(nn.Module):
    """Logits that put probability p on the token after each input token (mod vocab)."""

    vocab = 5

    def forward(self, input_ids, attention_mask=None):
        p = 0.7
        logits = torch.full((*input_ids.shape, self.vocab), math.log((1 - p) / (self.vocab - 1)))
        logits.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), math.log(p))
        return {"logits": logits}


def test_causal_lm_perplexity_scores_shifted_tokens_and_skips_masked_labels():
    ids = torch.tensor([[0, 1, 2, 4], [3, 4, 0, 1]])  # the model expects each token + 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    right = [[True, True, False], [True, True, True]]
    nll = [-math.log(0.7) if r else -math.log(0.3 / 4) for row in right for r in row]
    figures = CausalLM().evaluate(_Bigram(), [batch])
    assert figures["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)))
    # labels of -100 are context, not scored: only the last token of the first row counts
    labels = torch.tensor([[-100, -100, -100, 4], [-100, -100, -100, -100]])
    scored = CausalLM().evaluate(_Bigram(), [{**batch, "labels": labels}])
    assert scored["perplexity"] == pytest.approx(math.exp(-math.log(0.3 / 4)))


def test_registered_with_their_metrics_and_directions():
    from compressflow.plugins import load_plugins

    tasks = load_plugins().tasks
    assert tasks.get("classification") is Classification
    assert Classification.metrics["accuracy"].higher_is_better
    assert not Classification.metrics["loss"].higher_is_better
    assert tasks.get("embedding").uses_reference and not tasks.get("regression").uses_reference
    assert not CausalLM.metrics["perplexity"].higher_is_better
