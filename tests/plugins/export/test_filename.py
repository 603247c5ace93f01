"""export.filename stays inside the stage's work folder: refused at file:line when it names a
place outside, and checked again, resolved, when the stage writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressflow.errors import CompressflowError, ConfigError
from tests.conftest import write_pipeline

OUTSIDE = ["/tmp/elsewhere.cfpk", "../model.cfpk", "../../../../../../etc/passwd", "sub/../../x.cfpk",
           "~/model.cfpk", "C:\\Windows\\model.onnx", "sub\\..\\..\\x", "", ".", "sub/", "a\x00b"]


def _line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("method", ["packed", "onnx"])
@pytest.mark.parametrize("filename", OUTSIDE)
def test_a_filename_outside_the_work_folder_is_refused_at_its_line(tmp_path, method, filename):
    from compressflow.engine import validate

    path = write_pipeline(tmp_path, [{"train": {"epochs": 1}},
                                     {"export": {"method": method, "filename": filename}}])
    with pytest.raises(ConfigError) as error:
        validate(path)
    message = error.value.message
    assert message.startswith(f"{path}:{_line(path, 'filename')}: stage '1-export' (export/{method})")
    assert "filename" in message and "work folder" in message


@pytest.mark.parametrize("filename", ["model.cfpk", "packed/model.cfpk", "a/b/c.onnx", "./m.cfpk"])
def test_a_file_name_or_subfolder_inside_is_accepted(tmp_path, filename):
    from compressflow_export import PackedParams

    assert PackedParams(filename=filename).filename == filename


def test_the_write_is_confined_even_through_a_symlink(tmp_path):
    from compressflow_export.workfile import inside

    workdir, outside = tmp_path / "work", tmp_path / "outside"
    workdir.mkdir()
    outside.mkdir()
    (workdir / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CompressflowError, match="outside the stage's work folder"):
        inside(workdir, "link/model.cfpk")
    with pytest.raises(CompressflowError, match="outside the stage's work folder"):
        inside(workdir, "../model.cfpk")  # params built without validation
    target = inside(workdir, "sub/dir/model.cfpk")
    assert target == (workdir / "sub" / "dir" / "model.cfpk").resolve() and target.parent.is_dir()


def test_a_packed_file_in_a_subfolder_is_written_there(tmp_path):
    import torch

    from compressflow import StageContext
    from compressflow_data import digits
    from compressflow_export import PackedExport, PackedParams
    from compressflow.stage import DataSpec
    from compressflow_models.zoo import MLP

    torch.manual_seed(0)
    model = MLP(hidden=[8])
    bundle = digits(DataSpec(dataset="digits"), 0, model.input_shape)
    ctx = StageContext.detached(bundle, lambda m, loader=None: {}, workdir=tmp_path / "work")
    result = PackedExport("pack", PackedParams(filename="files/m.cfpk")).run(model, ctx)
    written = tmp_path / "work" / "files" / "m.cfpk"
    assert written.is_file() and result.artifacts["packed"] == written.resolve()
    assert result.packed_bytes == written.stat().st_size
