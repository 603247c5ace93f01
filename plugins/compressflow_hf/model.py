"""Hugging Face models as compressflow models: loading offline, pooling, saving.

An :class:`HFEncoder` takes the tokenizer's dict as keyword arguments and returns one
sentence embedding per sample, pooled over the real attention mask as sentence-transformers
pools; an :class:`HFCausalLM` returns the next-token logits. Both carry ``.tokenizer`` and
``.config``, deep-copy and pickle (the engine copies every stage's input and logs models
with pickle), and write a folder transformers and sentence-transformers load again with the
same outputs (:meth:`HFModel.save_pretrained`): attention heads a stage removed are written
back as zero heads, and a model holding int8 layers is refused rather than written broken.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compressflow import ConfigError, SourceContext
from compressflow_hf.folder import LEGACY_POOLING

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face offline while loading: nothing is fetched, whatever the user's settings.

    huggingface_hub reads its offline switch once, at import; where it is already imported
    the switch is set too, and both are restored afterwards.
    """
    saved = {name: os.environ.get(name) for name in OFFLINE_ENV}
    imported = "huggingface_hub.constants" in sys.modules
    os.environ.update({name: "1" for name in OFFLINE_ENV})
    from huggingface_hub import constants

    # imported just now, it read the switch set here: restore what the user's settings say
    was = constants.HF_HUB_OFFLINE if imported else any(
        (value or "").strip().lower() in ("1", "true", "yes", "on") for value in saved.values())
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars while loading (one line a stage is what the CLI prints)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def pool(tokens: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """One vector per sample from token states ``[batch, seq, dim]`` over the attended
    positions of ``mask`` ``[batch, seq]``, each mode as sentence-transformers' Pooling
    computes it (padded form), the modes concatenated in order."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    vectors = []
    for mode in modes:
        if mode == "cls":  # the first attended position, so left padding is skipped
            first = mask.to(torch.int).argmax(dim=1)
            vectors.append(tokens[torch.arange(len(tokens)), first])
        elif mode == "max":
            vectors.append(tokens.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            counts = torch.clamp(weights.sum(dim=1), min=1e-9)
            vectors.append((tokens * weights).sum(dim=1)
                           / (counts if mode == "mean" else counts.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(1, tokens.shape[1] + 1, dtype=tokens.dtype, device=tokens.device)
            start = mask.to(torch.int32).argmax(dim=1).to(tokens.dtype)
            weighted = weights * (positions.view(1, -1) - start.view(-1, 1)).unsqueeze(-1)
            vectors.append((tokens * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":  # the last attended position, so right padding is skipped
            found, index = mask.flip(1).max(dim=1)
            last = torch.where(found == 0, tokens.shape[1] - 1, tokens.shape[1] - 1 - index)
            vectors.append((tokens * weights)[torch.arange(len(tokens)), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(vectors, dim=-1)


class HFModel(nn.Module):
    """Base of the wrappers: the transformers model as ``.model``, its tokenizer and config.

    Attributes:
        model: the transformers ``PreTrainedModel`` (its Linear layers are what stages
            prune and quantize).
        tokenizer: the folder's ``AutoTokenizer``; the ``text`` dataset tokenizes with it.
        source: the folder the model was loaded from (for the record only).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, source: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source

    @property
    def config(self) -> Any:
        """The transformers config of the wrapped model."""
        return self.model.config

    def for_onnx_export(self) -> HFModel:
        """A copy to trace for ONNX: eager attention, whose pattern onnxruntime fuses (SDPA
        exports as one opaque op it cannot, and runs slower quantized)."""
        import copy

        twin = copy.deepcopy(self)
        if callable(getattr(twin.model, "set_attn_implementation", None)):
            twin.model.set_attn_implementation("eager")
        return twin.eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model and its tokenizer where ``hf:`` (and transformers) load them again,
        giving the same outputs; returns ``folder``.

        Attention heads a stage removed (structured_prune/heads) are written back as zero
        heads (:func:`with_full_heads`): the folder's attention runs at full width again, its
        FFN stays pruned, and this model is not changed. A model holding int8 layers
        (:func:`unwritable_layer`) raises ConfigError before anything is written.
        """
        refuse_unwritable(self)
        folder = Path(folder)
        model = with_full_heads(self.model) if heads_removed(self.model) else self.model
        with quiet():
            model.save_pretrained(folder)  # safetensors, the only format transformers 5 writes
            self.tokenizer.save_pretrained(folder)
        return folder


# torch.ao's int8 modules: the first is quantize/dynamic-int8's (torch.nn.quantized aliases it)
QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


def unwritable_layer(model: nn.Module) -> tuple[str, str] | None:
    """``(name, what it is)`` of the first layer ``save_pretrained`` cannot write as a folder
    that loads again: a torch.ao quantized module (quantize/dynamic-int8), or a weight held as
    a tensor subclass (torchao's int8 tensors). None when every layer is plain."""
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__module__.startswith(QUANTIZED_MODULES):
            return name, f"a {kind.__module__}.{kind.__name__}"
        for weight in module.parameters(recurse=False):
            if type(weight) not in (torch.Tensor, nn.Parameter):
                return name, f"a layer whose weight is a {type(weight).__name__}"
    return None


def refuse_unwritable(model: nn.Module) -> None:
    """ConfigError naming the first layer :func:`unwritable_layer` finds, if any.

    transformers writes such a model's config.json and then fails on the packed weights (or
    writes weights nothing reloads): a folder that looks saved and is broken.
    """
    found = unwritable_layer(model)
    if found is not None:
        raise ConfigError(
            f"save_pretrained: {found[0] or 'the model'} is {found[1]} (int8), which "
            "transformers cannot write as a folder that loads again",
            "save the float model (before quantize); for a deployable int8 file, export the "
            "float model with export: {method: onnx, pass_on: onnxruntime} then quantize: "
            "{method: ort-dynamic}, whose onnx artifact folder onnxruntime loads")


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every BERT-style attention block of ``model`` (BertAttention and
    its kin): one holding ``self.query``/``key``/``value`` and ``output.dense`` Linears."""
    found = []
    for name, module in model.named_modules():
        inner = getattr(module, "self", None)
        output = getattr(getattr(module, "output", None), "dense", None)
        if isinstance(output, nn.Linear) and all(
                isinstance(getattr(inner, key, None), nn.Linear) for key in ("query", "key", "value")):
            found.append((name, module))
    return found


def heads_removed(model: nn.Module) -> bool:
    """Whether some attention block of ``model`` holds fewer heads than its config's layout
    implies (``query`` narrower than ``hidden_size``). Such a plain folder does not load:
    transformers 5.17's BertSelfAttention derives the head size as hidden_size /
    num_attention_heads, and no setting (no ``head_dim``, no ``pruned_heads``) says otherwise."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return isinstance(hidden, int) and any(
        block.self.query.out_features != hidden for _name, block in attention_blocks(model))


def with_full_heads(model: nn.Module) -> nn.Module:
    """A twin of the transformers ``model`` whose folder transformers loads with the same
    outputs: every removed head comes back as an all-zero head (zero query, key and value
    rows and biases, zero columns of ``output.dense``). Its scores are uniform, but its zero
    values make it add exactly nothing. The twin shares every other tensor with ``model``
    (nothing large is copied) and ``model`` is not changed."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared)  # memo: modules are new, tensors stay shared
    hidden = int(twin.config.hidden_size)
    for name, block in attention_blocks(twin):
        attention = block.self
        size, width = int(attention.attention_head_size), attention.query.out_features
        if hidden % size or width % size or width > hidden:
            raise ConfigError(f"save_pretrained: {name} holds {width} attention channels in heads "
                              f"of {size}, which no head count of hidden size {hidden} matches",
                              "this attention layout cannot be written as a transformers folder")
        twin.config.num_attention_heads = hidden // size
        if width == hidden:
            continue
        for key in ("query", "key", "value"):
            setattr(attention, key, _grown(getattr(attention, key), rows=hidden))
        block.output.dense = _grown(block.output.dense, columns=hidden)
        attention.num_attention_heads, attention.all_head_size = hidden // size, hidden
    return twin


def _grown(layer: nn.Linear, *, rows: int | None = None, columns: int | None = None) -> nn.Linear:
    """``layer`` with zero output rows (and bias) up to ``rows``, or zero input columns up to
    ``columns``; its own weights and bias where they were."""
    out_features, in_features = rows or layer.out_features, columns or layer.in_features
    grown = nn.Linear(in_features, out_features, bias=layer.bias is not None,
                      device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: layer.out_features, : layer.in_features] = layer.weight
        if layer.bias is not None:
            grown.bias.zero_()
            grown.bias[: layer.out_features] = layer.bias
    return grown


class HFEncoder(HFModel):
    """An encoder returning the sentence embedding ``[batch, dim]`` from the tokenizer's dict.

    Attributes:
        pooling: the pooling modes (``("mean",)``); empty: the token states as they are.
        normalize: whether the pooled vector is scaled to unit L2 length.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: tuple[str, ...],
                 normalize: bool, source: str = "") -> None:
        super().__init__(model, tokenizer, source)
        self.pooling, self.normalize = tuple(pooling), bool(normalize)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        """The embedding of each sample; padding positions (mask 0) are never pooled."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                             **extra)
        tokens = outputs[0]
        if not self.pooling:
            return tokens
        embedding = pool(tokens, attention_mask, self.pooling)
        return F.normalize(embedding, p=2, dim=-1) if self.normalize else embedding

    def save_pretrained(self, folder: str | Path) -> Path:
        """The transformers folder plus sentence-transformers' ``modules.json``, pooling and
        normalize, so that ``SentenceTransformer(folder)`` embeds as this model does."""
        folder = super().save_pretrained(folder)
        modules = [{"idx": 0, "name": "0", "path": "",
                    "type": "sentence_transformers.models.Transformer"}]
        if self.pooling:
            modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                            "type": "sentence_transformers.models.Pooling"})
            (folder / "1_Pooling").mkdir(exist_ok=True)
            (folder / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": int(self.config.hidden_size),
                 **pooling_settings(self.pooling)}, indent=2))
        if self.normalize:
            modules.append({"idx": len(modules), "name": str(len(modules)),
                            "path": f"{len(modules)}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": int(self.tokenizer.model_max_length), "do_lower_case": False}))
        return folder


def pooling_settings(modes: tuple[str, ...]) -> dict[str, Any]:
    """A Pooling ``config.json``'s mode keys: the legacy booleans, which every
    sentence-transformers version reads, unless the modes' order needs ``pooling_mode``."""
    if list(modes) == [m for m in LEGACY_POOLING.values() if m in modes]:
        return {key: mode in modes for key, mode in LEGACY_POOLING.items()}
    return {"pooling_mode": list(modes)}


class HFCausalLM(HFModel):
    """A causal LM returning the next-token logits ``[batch, seq, vocab]``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **extra: Any) -> torch.Tensor:
        """Logits at every position; no key/value cache is kept between calls."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra.setdefault("use_cache", False)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                          **extra).logits

    def prefill(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run the prompt once, keeping its key/value cache: the state :meth:`decode` steps on."""
        out = self.model(**inputs, use_cache=True, return_dict=True)
        return {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1),
                "length": int(inputs["input_ids"].shape[1])}

    def decode(self, state: dict[str, Any]) -> torch.Tensor:
        """One next-token step after the prompt: the logits of ``state``'s token given the
        cache, which is then cut back to the prompt, so every step measures the same work."""
        out = self.model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True,
                         return_dict=True)
        cache = state["cache"]
        added = cache.get_seq_length() - state["length"]
        if added > 0:  # a negative crop removes that many tokens (transformers 5.17 on)
            cache.crop(-added)
        return out.logits


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "auto": "auto"}


def load(folder: Path, *, causal: bool, pooling: tuple[str, ...], normalize: bool,
         max_length: int | None, lower_case: bool, dtype: str, safetensors_only: bool,
         ctx: SourceContext) -> HFModel:
    """The folder's tokenizer and model, offline, without the folder's own code.

    :param causal: load ``AutoModelForCausalLM`` (logits), else ``AutoModel`` (pooled).
    :param max_length: tokens the tokenizer keeps at most (None: its own limit).
    :param lower_case: lower-case text before tokenizing (sentence-transformers' do_lower_case).
    :param safetensors_only: refuse any other weight format (the trusted-only switch).
    """
    with offline(), quiet():
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        where = str(folder)
        common = {"local_files_only": True, "trust_remote_code": False}
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **common)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{ctx.place}: hf: the tokenizer of {folder} does not load: "
                              f"{first_line(error)}",
                              "the folder needs the tokenizer files save_pretrained writes "
                              "(tokenizer.json or vocab.txt, tokenizer_config.json)") from None
        kind = AutoModelForCausalLM if causal else AutoModel
        try:
            model, report = kind.from_pretrained(
                where, dtype=DTYPES[dtype], use_safetensors=True if safetensors_only else None,
                output_loading_info=True, **common)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise ConfigError(f"{ctx.place}: hf: the model in {folder} does not load: "
                              f"{first_line(error)}",
                              "hf: loads architectures transformers knows, never a folder's own "
                              "code (trust_remote_code); the weights must fit config.json") from None
    # transformers fills weights a folder lacks with random values and only warns; an
    # embedding of random layers is no measurement. A missing BERT pooler is harmless:
    # hf: pools the token states, never the pooler's output.
    missing = sorted(k for k in report.get("missing_keys", ()) if not k.startswith("pooler."))
    wrong = sorted(str(k) for k in report.get("mismatched_keys", ()))
    if missing or wrong:
        names = ", ".join((missing + wrong)[:3]) + (", ..." if len(missing + wrong) > 3 else "")
        raise ConfigError(f"{ctx.place}: hf: the weights in {folder} do not fit its config.json "
                          f"({len(missing)} missing, {len(wrong)} of another shape: {names})",
                          "the folder must hold the weights save_pretrained wrote with this config")
    limit = getattr(model.config, "max_position_embeddings", -1)
    if max_length is not None:
        tokenizer.model_max_length = max_length
    elif isinstance(limit, int) and limit > 0:  # as sentence-transformers caps it
        tokenizer.model_max_length = min(tokenizer.model_max_length, limit)
    if lower_case:
        _lower_case(tokenizer)
    if causal and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # lines of different lengths are padded per batch; the mask hides the padding anyway
        tokenizer.pad_token = tokenizer.eos_token
    wrapped = (HFCausalLM(model, tokenizer, where) if causal
               else HFEncoder(model, tokenizer, pooling, normalize, where))
    return wrapped.eval()


def _lower_case(tokenizer: Any) -> None:
    """Make the tokenizer lower-case its text, as sentence-transformers does for do_lower_case."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        tokenizer.do_lower_case = True
        return
    current = backend.normalizer
    inner = list(current) if isinstance(current, Sequence) else [current] if current else []
    if not any(isinstance(n, Lowercase) for n in inner):
        backend.normalizer = Sequence([Lowercase(), *inner])


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type where it has none), for one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
