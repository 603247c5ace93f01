"""A GGUF file (llama.cpp's format) as a Hugging Face folder, converted once and cached.

transformers reads a GGUF file with ``gguf_file=`` (the ``gguf`` package needed) and
dequantizes its weights to float32, which takes 20-60 s for SmolLM2-135M on two cores. Its
``save_pretrained`` then refuses the model (the config still names the GGUF
quantization), so the conversion rebuilds the model from its config without the
``quantization_config``, loads the dequantized state dict and saves an ordinary folder
(safetensors and the tokenizer). Later loads read that folder: ``hf:`` loads it like any
other.

The cache lives in ``$COMPRESSFLOW_CACHE/gguf`` (default ``~/.cache/compressflow/gguf``), one
folder per GGUF content digest and transformers version, written under a temporary name and
renamed into place, so a conversion cut short leaves nothing a later load takes for whole.

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from compressflow import ConfigError, SourceContext
from compressflow.cache import cache_folder
from compressflow.fingerprint import files_digest

MAGIC = b"GGUF"
RECORD = "compressflow-gguf.json"  # written last: a folder without it is not a finished conversion


def check(path: Path, ctx: SourceContext) -> None:
    """A ConfigError at the source's place unless ``path`` starts with GGUF's magic."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as error:
        raise ConfigError(f"{ctx.place}: hf: {path} cannot be read ({error.strerror or error})",
                          "name a readable .gguf file") from None
    if head != MAGIC:
        raise ConfigError(f"{ctx.place}: hf: {path} is no GGUF file (it starts {head!r}, not "
                          f"{MAGIC!r})", "name a file llama.cpp's tools wrote, or a model folder")


def cache_root() -> Path:
    """Where converted folders are kept (``$COMPRESSFLOW_CACHE/gguf``)."""
    return cache_folder("gguf")


def converted(path: Path, ctx: SourceContext) -> Path:
    """The Hugging Face folder of the GGUF file ``path``: the cached one, else converted now."""
    import transformers

    digest = files_digest([path])  # hashed once: the file is ~100 MB
    target = cache_root() / f"{path.stem}-{digest}-transformers{transformers.__version__}"
    if (target / RECORD).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(path, work, ctx)
        (work / RECORD).write_text(json.dumps({"gguf": str(path), "digest": digest}))
        try:
            os.replace(work, target)
        except OSError:  # another process finished the same conversion first: use its folder
            if not (target / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(path: Path, folder: Path, ctx: SourceContext) -> None:
    """Dequantize ``path`` with transformers and save it as an ordinary folder in ``folder``."""
    import torch

    from compressflow_hf.model import first_line, offline, quiet

    with offline(), quiet():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common = {"gguf_file": path.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **common)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **common)
        except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, ImportError,
                struct.error) as error:  # what a truncated or foreign file raises in its reader
            raise ConfigError(f"{ctx.place}: hf: {path} does not load as a GGUF model: "
                              f"{first_line(error)}",
                              "transformers reads GGUF with the gguf package installed "
                              "(pip install 'compressflow[llm]'), for the architectures it "
                              "knows (llama, mistral, qwen2, ...)") from None
        # save_pretrained refuses a config that still names the GGUF quantization
        settings = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        config = type(model.config).from_dict(settings)
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        clean.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
