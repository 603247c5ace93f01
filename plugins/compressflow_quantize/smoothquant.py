"""SmoothQuant (Xiao et al., ICML 2023) through llm-compressor, then torch.ao dynamic int8.

int8 activations lose most where a few channels carry outliers. SmoothQuant divides each
input channel of a Linear by s_j = max|X_j|^a / max|W_j|^(1-a) and multiplies the weights'
columns by it, folding the division into the norm before (LLaMA: ``input_layernorm`` before
q/k/v, ``post_attention_layernorm`` before gate/up): the model computes the same function,
with activations that quantize better. llm-compressor's ``SmoothQuantModifier`` measures
the activation ranges on the calibration batches and smooths the model in place; then
torch.ao's ``quantize_dynamic`` makes every Linear int8 (weights per channel, activations
per tensor at run time): W8A8, measured like every stage.

llm-compressor is the ``llm`` extra; it is imported only here, when the stage runs.
"""

from __future__ import annotations

from typing import Any

from compressflow import ConfigError


def smooth(model: Any, batches: list, strength: float) -> None:
    """Smooth ``model`` (an ``hf:`` causal LM: ``model.model`` a transformers model,
    ``model.tokenizer`` its tokenizer) in place on the token rows of ``batches``."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
        from loguru import logger
    except ImportError as error:
        raise ConfigError(f"quantize/smoothquant needs llm-compressor ({error})",
                          "pip install 'compressflow[llm]' (make installs it)") from None
    inner, tokenizer = getattr(model, "model", None), getattr(model, "tokenizer", None)
    if inner is None or tokenizer is None or not hasattr(inner, "config"):
        raise ConfigError("quantize/smoothquant runs on a Hugging Face causal LM (an hf: source)",
                          "load the model with hf: (a folder, a package's folder or a .gguf)")
    rows, masks = [], []
    for inputs, _targets in batches:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        rows += ids.tolist()
        masks += (mask if mask is not None else ids.new_ones(ids.shape)).tolist()
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": masks})
    logger.disable("llmcompressor")  # its INFO lines per layer; the stage's notes say what ran
    try:
        oneshot(model=inner, dataset=data, recipe=[SmoothQuantModifier(smoothing_strength=strength)],
                processor=tokenizer, num_calibration_samples=len(rows),
                max_seq_length=max(len(r) for r in rows), shuffle_calibration_samples=False)
    finally:
        logger.enable("llmcompressor")
