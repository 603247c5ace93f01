"""``export/hf``: the current Hugging Face model as a folder transformers, sentence-transformers
and ``hf:`` load, kept with the stage's MLflow run.

The folder is what :meth:`compressflow_hf.model.HFModel.save_pretrained` writes (safetensors
weights, config, tokenizer, and for an encoder sentence-transformers' modules): heads a stage
removed come back as zero heads so that it loads, and a model with int8 layers is refused.
The folder is then loaded again through ``hf:`` and its outputs compared with the model's on
a validation batch, so that a folder that does not give this model back fails the stage
rather than being kept. The model passes on unchanged.

    - structured_prune: {method: heads, heads: 0.5, ffn: 0.5}
    - export: {method: hf}

No torch at import: the plugin loads for validation without it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from compressflow import ConfigError, SourceContext, Stage, StageFailed, StageParams, StageResult

WHERE = "export/hf"
RULE = "a folder name inside the stage's work folder (subfolders allowed: hf/model)"


def check_folder(value: str) -> str:
    """``value`` if it names a folder that stays inside the stage's work folder, else a
    validation error at the param's line. Backslashes and drive letters are refused on every
    system, so that a pipeline means the same folder wherever it runs."""
    posix = PurePosixPath(value)
    if not value.strip() or posix.name in ("", "."):
        problem = "names no folder"
    elif posix.is_absolute() or PureWindowsPath(value).drive:
        problem = "is an absolute path"
    elif "\\" in value or "\x00" in value:
        problem = "holds a backslash or NUL (use / between subfolders)"
    elif ".." in posix.parts or value.startswith("~"):
        problem = "climbs out of the work folder"
    else:
        return value
    raise PydanticCustomError("work_folder", "{problem}: must be {rule}",
                              {"problem": problem, "rule": RULE})


WorkFolder = Annotated[str, AfterValidator(check_folder)]
"""A str param validated by :func:`check_folder`."""


class HFExportParams(StageParams):
    """Where the folder goes and how closely the reloaded folder must match the model."""

    folder: WorkFolder = Field(
        "model", description="folder in the stage's work folder (no absolute path, no ..); "
        "its last part is the MLflow artifact's path")
    tolerance: float | None = Field(
        1e-4, gt=0, description="fail when the reloaded folder's outputs on a validation batch "
        "differ more from the model's (None: do not reload)")


def inside(workdir: Path, name: str) -> Path:
    """``workdir / name`` resolved; a ConfigError where it lands outside ``workdir`` (params
    built without validation, a symlinked subfolder) or is ``workdir`` itself."""
    root = workdir.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ConfigError(f"{WHERE}: folder '{name}' is outside the stage's work folder {root}",
                          f"folder must be {RULE}")
    return target


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def reload(folder: Path, place: str):
    """The model ``hf:`` loads from ``folder`` (weights as stored, pooling as it says)."""
    from compressflow_hf import HFSource

    context = SourceContext(base_dir=folder, place=place)
    return HFSource().load(str(folder), {"dtype": "auto"}, context)


def output_difference(model, other, inputs, task) -> float:
    """Largest absolute difference between two models' predictions on ``inputs`` (inf where
    their shapes differ)."""
    import torch

    with torch.no_grad():
        expected = task.predict(model.eval(), inputs)
        found = task.predict(other.eval(), inputs)
    if found.shape != expected.shape:
        return float("inf")
    return float((found.float() - expected.float()).abs().max())


def checked_reload(model, folder: Path, ctx, tolerance: float, where: str, why: str = ""):
    """``(difference, reloaded)``: the model ``hf:`` loads from ``folder`` and its largest
    output difference from ``model`` on a validation batch; StageFailed naming ``where`` (and
    ``why``, the hint's start) where it exceeds ``tolerance``."""
    inputs = ctx.data.example_input(8, ctx.task)
    reloaded = reload(folder, f"stage '{ctx.name}'")
    difference = output_difference(model, reloaded, inputs, ctx.task)
    if not difference <= tolerance:
        raise StageFailed(
            f"{where}: the folder {folder} loads back with outputs {difference:.3g} "
            f"away from the model's (tolerance {tolerance:g})",
            f"{why}set tolerance: null to keep the folder anyway")
    return difference, reloaded


class HFExport(Stage):
    """Write the Hugging Face model with ``save_pretrained`` into the stage's work folder,
    check that ``hf:`` loads it back with the same outputs, keep it as the ``model``
    artifact; the model passes on unchanged."""

    kind = "export"
    method = "hf"
    Params = HFExportParams

    def run(self, model, ctx):
        """Save, reload and compare, and say how large the folder is."""
        from compressflow_hf.model import HFModel, heads_removed

        if not isinstance(model, HFModel):
            raise ConfigError(
                f"{WHERE}: the model is a {type(model).__name__}, not a Hugging Face model "
                "of the hf: source",
                "load the model with source: hf:<folder>, and put export/hf before stages that "
                "replace it (export/onnx with pass_on: onnxruntime, quantize/ort-*)")
        p = self.params
        folder = model.save_pretrained(inside(ctx.workdir, p.folder))
        size = folder_bytes(folder)
        notes = [f"Hugging Face folder {size:,} bytes (safetensors weights, config, tokenizer)"]
        if heads_removed(model.model):
            notes.append("removed attention heads are written as zero heads (transformers "
                         "derives BERT's head size from hidden_size): same outputs, attention "
                         "at full width in the folder")
        metrics = {"folder_bytes": float(size)}
        if p.tolerance is not None:
            metrics["reload_max_abs_diff"], _ = checked_reload(
                model, folder, ctx, p.tolerance, WHERE,
                "save_pretrained cannot describe this model's shapes to transformers; ")
        return StageResult(model, metrics=metrics, artifacts={"model": folder}, notes=notes)
