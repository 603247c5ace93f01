"""compressflow_data.files: what the npz, csv, image-folder and text datasets share, a
missing file named at its line, the files' content in the stage keys.

Every file is written here, small; pipelines run through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugins.data.conftest import (
    MLP3,
    assert_one_error,
    digest,
    line_of,
    pipeline,
    write_csv,
    write_lines,
    write_npz,
)


# --- bad input: exit 2, one message at its line, no traceback ----------------------------


@pytest.mark.parametrize(("dataset", "args", "missing"), [
    ("csv", {"path": "data/nope.csv", "label": "animal"}, "data/nope.csv"),
    ("npz", {"path": "nope.npz"}, "nope.npz"),
    ("image-folder", {"root": "no-images"}, "no-images"),
])
def test_a_missing_file_names_it_at_its_line(tmp_path, elsewhere, cli, dataset, args, missing):
    path = pipeline(tmp_path, {"dataset": dataset, "args": args}, MLP3, name="missing")
    result = cli("validate", path)
    assert_one_error(result, str(tmp_path / missing), f"{path}:{line_of(path, 'args:')}")


def test_a_missing_file_stops_a_run_before_anything_is_logged(tmp_path, elsewhere, cli):
    path = pipeline(tmp_path, {"dataset": "npz", "args": {"path": "gone.npz"}}, MLP3, name="gone")
    store = tmp_path / "never.db"
    result = cli("run", path, "--tracking-uri", f"sqlite:///{store}", "--quiet")
    assert_one_error(result, str(tmp_path / "gone.npz"), f"{path}:{line_of(path, 'args:')}",
                     "hint:")
    assert not store.exists()


# --- digests: the files' content in the stage keys ---------------------------------------


def flip_last_byte(path: Path) -> None:
    """Change the file's last character but one (size kept): an edit no name shows."""
    data = bytearray(path.read_bytes())
    data[-2] = ord("x") if data[-2] != ord("x") else ord("y")
    path.write_bytes(bytes(data))


def test_csv_npz_and_text_digests_follow_every_files_bytes(tmp_path):
    write_csv(tmp_path / "a.csv", seed=0)
    write_csv(tmp_path / "t.csv", seed=1)
    write_npz(tmp_path / "a.npz", 30, seed=0)
    write_lines(tmp_path / "train.txt", ["a b", "c d"])
    write_lines(tmp_path / "eval.txt", ["e f"])
    cases = [  # (dataset, args, task, the change: the test file, a re-saved array, an eval line)
        ("csv", {"path": "a.csv", "test_path": "t.csv", "label": "animal"}, "classification",
         lambda: flip_last_byte(tmp_path / "t.csv")),
        ("npz", {"path": "a.npz", "x": "features", "y": "labels"}, "classification",
         lambda: write_npz(tmp_path / "a.npz", 30, seed=1)),
        ("text", {"paths": ["train.txt"], "eval_paths": ["eval.txt"]}, "embedding",
         lambda: flip_last_byte(tmp_path / "eval.txt"))]
    for name, args, task, change in cases:
        before = digest(name, args, tmp_path, task=task)
        assert before is not None and digest(name, args, tmp_path, task=task) == before
        change()
        assert digest(name, args, tmp_path, task=task) != before, name
