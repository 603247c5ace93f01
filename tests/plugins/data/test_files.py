"""compressflow_data.files: npz, csv, image-folder and text datasets from the user's files.

Every file is written here, small; pipelines run through the CLI into one sqlite store.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from compressflow import ConfigError, DataContext, DataSpec
from compressflow_data import files

CENTERS = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
NAMES = ["cat", "dog", "fox"]


# --- writing the user's files ------------------------------------------------------------


def blobs(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs in 3-D (one per class), as float features and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    return CENTERS[labels] + rng.normal(0, 0.7, (count, 3)), labels


def write_csv(path: Path, count: int = 240, seed: int = 0, bad: tuple[int, str] | None = None) -> Path:
    """A table with an id column (text), three features, string labels; ``bad``: (row, value)
    put in column f2 of that data row."""
    x, labels = blobs(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "f0", "f1", "f2", "animal"])
        for row, (features, label) in enumerate(zip(x, labels), start=1):
            cells = [f"s{row}", *(f"{v:.4f}" for v in features), NAMES[label]]
            if bad is not None and bad[0] == row:
                cells[3] = bad[1]
            writer.writerow(cells)
    return path


def write_npz(path: Path, count: int, seed: int) -> Path:
    x, labels = blobs(count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=x.astype(np.float32), labels=labels)
    return path


def write_images(root: Path, per_class: int = 40, seed: int = 0, odd_size: bool = False) -> Path:
    """8x8 grayscale PNGs of three classes: bright top, bright bottom, bright left half."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    masks = {"bottom": np.zeros((8, 8)), "left": np.zeros((8, 8)), "top": np.zeros((8, 8))}
    masks["top"][:4], masks["bottom"][4:], masks["left"][:, :4] = 1, 1, 1
    for name, mask in masks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(40 + 160 * mask + rng.normal(0, 30, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    if odd_size:
        Image.fromarray(np.zeros((9, 8), dtype=np.uint8), mode="L").save(root / "top" / "odd.png")
    (root / "top" / "notes.txt").write_text("not an image: ignored")
    return root


def pipeline(folder: Path, data: dict, model: dict, stages: list | None = None, *,
             name: str, **extra) -> Path:
    document = {
        "name": name,
        "seed": 0,
        "model": model,
        "data": data,
        "measure": {"latency": False},
        "tracking": {"log_models": False},
        "stages": stages or [{"name": "baseline", "train": {"epochs": 8, "lr": 0.01}},
                             {"prune": {"sparsity": 0.5}},
                             {"finetune": {"epochs": 2, "lr": 0.005}}],
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the first line of the pipeline's ``data:`` section that holds ``text``."""
    lines = path.read_text().splitlines()
    start = lines.index("data:")
    return next(i for i, line in enumerate(lines[start:], start + 1) if text in line)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One sqlite store for the module's runs (each pipeline its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Work in a folder other than the pipeline's: relative paths must not start here."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def final_runs(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def assert_learned(result, uri: str, experiment: str, floor: float = 0.85) -> None:
    assert result.exit_code == 0, result.output
    runs = final_runs(uri, experiment)
    assert set(runs) == {"input", "baseline", "1-prune", "2-finetune"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["input"].data.metrics["accuracy"] < 0.6  # chance is 1/3
    for name in ("baseline", "2-finetune"):
        assert runs[name].data.metrics["accuracy"] >= floor, (name, runs[name].data.metrics)
    assert runs["1-prune"].data.metrics["sparsity"] > 0.3


# --- 1. whole pipelines, no plugin code --------------------------------------------------


MLP3 = {"source": "zoo:mlp", "args": {"in_features": 3, "hidden": [16], "num_classes": 3}}


def test_csv_pipeline_learns_from_a_relative_path(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_csv(project / "data" / "train.csv")
    path = pipeline(project, {"dataset": "csv", "batch_size": 32,
                              "args": {"path": "data/train.csv", "label": "animal"}},
                    MLP3, name="csv-blobs")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "csv-blobs")
    assert not (elsewhere / "data").exists()


def test_npz_pipeline_evaluates_on_test_path(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_npz(project / "train.npz", 240, seed=1)
    write_npz(project / "test.npz", 90, seed=2)
    path = pipeline(project, {"dataset": "npz", "batch_size": 32,
                              "args": {"path": "train.npz", "test_path": "test.npz",
                                       "x": "features", "y": "labels"}},
                    MLP3, name="npz-blobs")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "npz-blobs")
    # the evaluated split is the test file: all 90 of its samples, none held out of train
    from mlflow.tracking import MlflowClient

    run = final_runs(shared_store, "npz-blobs")["input"]
    inputs = MlflowClient(shared_store).get_run(run.info.run_id).inputs.dataset_inputs
    assert any('"eval_samples": "90"' in d.dataset.source for d in inputs), inputs


def test_image_folder_pipeline_learns_with_a_cnn(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_images(project / "images")
    cnn = {"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 3}}
    path = pipeline(project, {"dataset": "image-folder", "batch_size": 16,
                              "args": {"root": "images", "grayscale": True}},
                    cnn, name="images-halves")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "images-halves")


# --- 2. bad input: exit 2, one message at its line, no traceback -------------------------


def assert_one_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.count("error:") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


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


def test_an_unknown_arg_is_named_at_its_line(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=30)
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "animal",
                                                          "delimeter": ";"}}, MLP3, name="typo")
    result = cli("validate", path)
    assert_one_error(result, "delimeter", f"{path}:{line_of(path, 'delimeter')}")


def test_a_non_numeric_cell_names_its_row_and_column(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=60, bad=(17, "n/a"))
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "animal"}},
                    MLP3, name="cell")
    result = cli("run", path, "--tracking-uri", f"sqlite:///{tmp_path / 'db.db'}", "--quiet")
    assert_one_error(result, str(tmp_path / "t.csv"), "row 17", "line 18", "column 'f2'", "'n/a'",
                     f"{path}:")


def test_a_missing_column_is_found_during_validation(tmp_path, elsewhere, cli):
    write_csv(tmp_path / "t.csv", count=30)
    path = pipeline(tmp_path, {"dataset": "csv", "args": {"path": "t.csv", "label": "species"}},
                    MLP3, name="column")
    assert_one_error(cli("validate", path), "'species'", "'animal'")


def test_images_of_mixed_sizes_without_size_stop_the_run(tmp_path, elsewhere, cli):
    write_images(tmp_path / "images", per_class=3, odd_size=True)
    cnn = {"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 3}}
    path = pipeline(tmp_path, {"dataset": "image-folder",
                               "args": {"root": "images", "grayscale": True}}, cnn, name="sizes")
    result = cli("run", path, "--tracking-uri", f"sqlite:///{tmp_path / 'db.db'}", "--quiet")
    assert_one_error(result, "odd.png", "9x8", "size")


# --- the datasets directly ---------------------------------------------------------------


def load(dataset_name: str, args: dict, folder: Path, *, task: str = "classification",
         model: nn.Module | None = None, **spec):
    from compressflow.plugins import load_plugins

    dataset = load_plugins().datasets.get(dataset_name)
    params = dataset.Params.model_validate(args, context={"base_dir": folder})
    ctx = DataContext(DataSpec(dataset=dataset_name, **spec), 0, folder, "p.yaml:4", task,
                      getattr(model, "input_shape", None), model)
    dataset.check(params, ctx)
    return dataset.load(params, ctx)


def test_csv_string_labels_default_features_and_test_split(tmp_path):
    write_csv(tmp_path / "train.csv", count=60, seed=0)
    write_csv(tmp_path / "test.csv", count=21, seed=1)
    bundle = load("csv", {"path": "train.csv", "label": "animal", "test_path": "test.csv"},
                  tmp_path, batch_size=8, calibration_batches=2)
    x, y = bundle.train.dataset.tensors
    x_val, y_val = bundle.val.dataset.tensors
    assert x.shape == (60, 3) and x_val.shape == (21, 3)  # id (text) is no feature
    assert y.dtype == torch.long and set(y.tolist()) == {0, 1, 2}
    assert y_val.tolist() == [i % 3 for i in range(21)]  # cat=0, dog=1, fox=2, in file order
    assert bundle.num_classes == 3 and bundle.sample_shape == (3,)
    assert x.mean(0).abs().max() < 1e-5  # standardized by the training split
    assert "0=cat" in bundle.info.source and "2=fox" in bundle.info.source
    assert bundle.info.splits == {"train": 60, "eval": 21, "calibration": 16}
    assert sum(len(b[0]) for b in bundle.calibration) == 16


def test_csv_regression_takes_float_targets_and_honours_features(tmp_path):
    rows = [["a", "b", "target"]] + [[str(i), str(2 * i), str(0.5 * i)] for i in range(50)]
    (tmp_path / "r.csv").write_text("\n".join(";".join(r) for r in rows) + "\n")
    bundle = load("csv", {"path": "r.csv", "label": "target", "features": ["b"], "delimiter": ";",
                          "standardize": False}, tmp_path, task="regression", val_fraction=0.2)
    (x, y), (x_val, y_val) = bundle.train.dataset.tensors, bundle.val.dataset.tensors
    assert y.dtype == torch.float32 and bundle.num_classes is None
    assert len(y) == 40 and len(y_val) == 10
    assert torch.allclose(y, x[:, 0] / 4)  # target = b / 4, row for row
    with pytest.raises(ConfigError, match="regression"):
        load("npz", {"path": str(write_regression_npz(tmp_path))}, tmp_path)


def write_regression_npz(folder: Path) -> Path:
    np.savez(folder / "r.npz", x=np.arange(20.0).reshape(10, 2), y=np.linspace(0, 1, 10))
    return folder / "r.npz"


def test_npz_split_is_seeded_stratified_and_train_fraction_kept(tmp_path):
    write_npz(tmp_path / "d.npz", 300, seed=0)
    args = {"path": "d.npz", "x": "features", "y": "labels"}
    full = load("npz", args, tmp_path, val_fraction=0.2)
    again = load("npz", args, tmp_path, val_fraction=0.2)
    small = load("npz", args, tmp_path, val_fraction=0.2, train_fraction=0.5)
    for a, b in zip(full.val.dataset.tensors, again.val.dataset.tensors):
        assert torch.equal(a, b)
    assert np.bincount(full.val.dataset.tensors[1].numpy()).tolist() == [20, 20, 20]
    assert len(small.train.dataset) == 120
    assert np.bincount(small.train.dataset.tensors[1].numpy()).tolist() == [40, 40, 40]
    for a, b in zip(full.val.dataset.tensors, small.val.dataset.tensors):  # eval unchanged
        assert torch.equal(a, b)
    first = [y.tolist() for _, y in load("npz", args, tmp_path).train]
    assert first == [y.tolist() for _, y in load("npz", args, tmp_path).train]  # seeded shuffle
    with pytest.raises(ConfigError, match="no array 'y'") as caught:
        load("npz", {"path": "d.npz", "x": "features"}, tmp_path)
    assert "'features', 'labels'" in caught.value.hint
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot be read as .npz"):
        load("npz", {"path": "text.npz"}, tmp_path)
    regression = load("npz", {"path": str(write_regression_npz(tmp_path))}, tmp_path,
                      task="regression")
    assert regression.train.dataset.tensors[1].dtype == torch.float32


def test_image_folder_rgb_resize_and_per_channel_statistics(tmp_path):
    write_images(tmp_path / "train", per_class=6)
    write_images(tmp_path / "test", per_class=2, seed=1)
    bundle = load("image-folder", {"root": "train", "test_root": "test", "size": [4, 6]}, tmp_path)
    x, y = bundle.train.dataset.tensors
    assert x.shape == (18, 3, 4, 6) and bundle.sample_shape == (3, 4, 6)
    assert y.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # bottom, left, top: sorted folder names
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert x.std(dim=(0, 2, 3), unbiased=False).sub(1).abs().max() < 1e-4
    assert len(bundle.val.dataset) == 6 and bundle.num_classes == 3
    gray = load("image-folder", {"root": "train", "grayscale": True}, tmp_path, shape="flat")
    assert gray.sample_shape == (64,)


# --- 3. text: a real (tiny) tokenizer, no download ---------------------------------------


class WhitespaceTokenizer:
    """A word-level tokenizer with the Hugging Face call signature: ids from a vocabulary
    (0 pad, 1 unknown), padded to the longest text with return_tensors="pt"."""

    pad_token, pad_token_id = "<pad>", 0

    def __init__(self, words: list[str], eos: str | None = None) -> None:
        self.vocab = {"<pad>": 0, "<unk>": 1}
        for word in [*words, *([eos] if eos else [])]:
            self.vocab.setdefault(word, len(self.vocab))
        self.eos_token_id = self.vocab[eos] if eos else None

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        ids = [[self.vocab.get(word, 1) for word in text.split()] for text in texts]
        if truncation and max_length:
            ids = [row[:max_length] for row in ids]
        masks = [[1] * len(row) for row in ids]
        if return_tensors != "pt":
            return {"input_ids": ids, "attention_mask": masks}
        longest = max(map(len, ids))
        if not padding and len({len(row) for row in ids}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        pad = lambda rows: torch.tensor([row + [0] * (longest - len(row)) for row in rows])
        return {"input_ids": pad(ids), "attention_mask": pad(masks)}


class TinyLM(nn.Module):
    """Embedding -> Linear over the vocabulary: logits (B, T, V)."""

    def __init__(self, tokenizer: WhitespaceTokenizer, width: int = 8) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(len(tokenizer.vocab), width)
        self.head = nn.Linear(width, len(tokenizer.vocab))

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def tiny_lm(words: list[str], eos: str | None = "<eos>") -> TinyLM:
    """A factory for ``import:`` sources."""
    torch.manual_seed(0)
    return TinyLM(WhitespaceTokenizer(words, eos))


class TinyEncoder(TinyLM):
    """Mean of the attended tokens' embeddings, projected: one vector a line."""

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


def tiny_encoder(words: list[str]) -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder(WhitespaceTokenizer(words))


WORDS = "a b c d e f g h i j".split()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_lines_are_batched_padded_per_batch_and_eval_comes_from_eval_paths(tmp_path):
    write_lines(tmp_path / "train.txt", ["a", "", "a b c", "a b", "   ", "a b c d e f g"])
    write_lines(tmp_path / "more.txt", ["j i"])
    write_lines(tmp_path / "eval.txt", ["h", "h i j", "g h"])
    model = tiny_lm(WORDS, eos=None)
    args = {"paths": ["train.txt", "more.txt"], "eval_paths": ["eval.txt"], "max_length": 5}
    bundle = load("text", args, tmp_path, task="embedding", model=model, batch_size=2,
                  calibration_batches=1)
    vocab = model.tokenizer.vocab
    seen, order = [], []
    for batch in bundle.train:
        order.append(batch["input_ids"][:, 0].tolist())
        assert set(batch) == {"input_ids", "attention_mask"}
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # the batch's longest, no more
        assert int(lengths.max()) <= 5  # max_length truncates
        seen += [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], lengths)]
    assert sorted(seen) == sorted([(vocab["a"],), tuple(vocab[w] for w in "abc"),
                                   (vocab["a"], vocab["b"]), tuple(vocab[w] for w in "abcde"),
                                   (vocab["j"], vocab["i"])])  # blank lines skipped
    again = load("text", args, tmp_path, task="embedding", model=model, batch_size=2,
                 calibration_batches=1)
    assert order == [b["input_ids"][:, 0].tolist() for b in again.train]  # seeded shuffle
    val = list(bundle.val)
    assert [b["input_ids"].tolist() for b in val] == [
        [[vocab["h"], 0, 0], [vocab["h"], vocab["i"], vocab["j"]]], [[vocab["g"], vocab["h"]]]]
    assert val[0]["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert bundle.info.splits == {"train": 5, "eval": 3, "calibration": 2}
    assert bundle.num_classes is None and bundle.sample_shape is None


def test_causal_lm_windows_and_labels_exactly(tmp_path):
    # one stream: a b c <eos> d e f g <eos> (9 tokens); window 4, stride 3:
    # windows start at 0, 3 and (the tail) 5
    write_lines(tmp_path / "train.txt", ["a b c", "", "d e f g"])
    write_lines(tmp_path / "eval.txt", ["h i j", "a"])
    model = tiny_lm(WORDS)
    bundle = load("text", {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "window": 4,
                           "stride": 3}, tmp_path, task="causal-lm", model=model, batch_size=8)
    v = model.tokenizer.vocab
    a, b, c, d, e, f, g, h, i, j, eos = (v[w] for w in [*"abcdefghij", "<eos>"])
    windows = bundle.train.dataset
    assert windows.input_ids.tolist() == [[a, b, c, eos], [eos, d, e, f], [e, f, g, eos]]
    assert windows.labels.tolist() == [[a, b, c, eos], [-100, d, e, f], [-100, -100, g, eos]]
    # the task scores labels[1:] from logits[:-1]: every token after the first exactly once
    scored = [t for row in windows.labels.tolist() for t in row[1:] if t != -100]
    assert scored == [b, c, eos, d, e, f, g, eos]
    batch = next(iter(bundle.val))  # from eval.txt only: h i j <eos> a <eos> (6 tokens)
    assert batch["input_ids"].tolist() == [[h, i, j, eos], [j, eos, a, eos]]
    assert batch["labels"].tolist() == [[h, i, j, eos], [-100, -100, a, eos]]
    assert batch["attention_mask"].tolist() == [[1] * 4] * 2

    from compressflow_tasks import CausalLM

    task = CausalLM()
    inputs, labels = task.split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is batch["labels"]
    assert len(task.token_nll(task.predict(model, inputs), labels)) == 5  # 3 + 2 new tokens
    first = load("text", {"paths": ["train.txt"], "eval_paths": ["eval.txt"], "window": 4,
                          "stride": 3, "eval_tokens": 5}, tmp_path, task="causal-lm", model=model)
    assert first.val.dataset.input_ids.tolist() == [[h, i, j, eos], [i, j, eos, a]]  # 5 tokens
    assert first.val.dataset.labels.tolist() == [[h, i, j, eos], [-100, -100, -100, a]]
    assert first.train.dataset.input_ids.tolist() == windows.input_ids.tolist()  # train as before


def test_stride_equal_to_window_and_a_short_stream():
    inputs, labels = files.stream_windows(list(range(10, 20)), 4, 2)
    assert inputs.tolist() == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17], [16, 17, 18, 19]]
    assert labels.tolist() == [[10, 11, 12, 13], [-100, -100, 14, 15], [-100, -100, 16, 17],
                               [-100, -100, 18, 19]]
    inputs, labels = files.stream_windows(list(range(8)), 4, 4)
    assert inputs.tolist() == labels.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    inputs, labels = files.stream_windows([5, 6, 7], 4, 2)
    assert inputs.tolist() == labels.tolist() == [[5, 6, 7]]


def test_text_without_a_tokenizer_or_with_bad_windows_is_a_config_error(tmp_path):
    write_lines(tmp_path / "t.txt", ["a b"])
    args = {"paths": ["t.txt"], "eval_paths": ["t.txt"]}
    with pytest.raises(ConfigError, match="tokenizer") as caught:
        load("text", args, tmp_path, task="causal-lm", model=nn.Linear(2, 2))
    assert "`.tokenizer`" in caught.value.hint
    with pytest.raises(ConfigError, match="causal-lm"):
        load("text", {**args, "window": 8}, tmp_path, task="embedding", model=tiny_lm(WORDS))
    with pytest.raises(Exception, match="stride"):
        files.Text.Params.model_validate({**args, "window": 4, "stride": 5})
    with pytest.raises(Exception, match="eval_tokens needs window"):
        files.Text.Params.model_validate({**args, "eval_tokens": 100})
    with pytest.raises(Exception, match="eval_paths"):
        files.Text.Params.model_validate({"paths": ["t.txt"]})
    with pytest.raises(ConfigError, match="missing.txt"):
        load("text", {**args, "eval_paths": ["missing.txt"]}, tmp_path, task="causal-lm",
             model=tiny_lm(WORDS))


def test_causal_lm_pipeline_trains_on_windows(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    project.mkdir()
    sentence = "a b c d e f g h i j"
    write_lines(project / "train.txt", [sentence] * 30)
    write_lines(project / "eval.txt", [sentence] * 5)
    model = {"source": "import:tests.plugins.data.test_files:tiny_lm", "args": {"words": WORDS}}
    path = pipeline(project, {"dataset": "text", "batch_size": 8,
                              "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"],
                                       "window": 16, "stride": 8}},
                    model, [{"name": "baseline", "train": {"epochs": 6, "lr": 0.05}},
                            {"prune": {"sparsity": 0.3}}, {"finetune": {"epochs": 2, "lr": 0.02}}],
                    name="text-lm", task="causal-lm")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert result.exit_code == 0, result.output
    runs = final_runs(shared_store, "text-lm")
    before, after = runs["input"].data.metrics["perplexity"], runs["2-finetune"].data.metrics["perplexity"]
    assert before > 8 and after < 2, (before, after)  # a repeated sentence is learned


def test_embedding_pipeline_prunes_and_recovers_on_padded_lines(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    project.mkdir()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(60)]
    write_lines(project / "train.txt", lines[:48])
    write_lines(project / "eval.txt", lines[48:])
    model = {"source": "import:tests.plugins.data.test_files:tiny_encoder", "args": {"words": WORDS}}
    path = pipeline(project, {"dataset": "text", "batch_size": 8,
                              "args": {"paths": ["train.txt"], "eval_paths": ["eval.txt"]}},
                    model, [{"prune": {"sparsity": 0.6}}, {"finetune": {"epochs": 3, "lr": 0.01}}],
                    name="text-embedding", task="embedding")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert result.exit_code == 0, result.output
    runs = final_runs(shared_store, "text-embedding")
    assert runs["input"].data.metrics["cosine_mean"] == pytest.approx(1.0)
    pruned, recovered = (runs[n].data.metrics["cosine_mean"] for n in ("0-prune", "1-finetune"))
    assert pruned < 0.999 and recovered > pruned, (pruned, recovered)
    assert runs["0-prune"].data.metrics["sparsity"] > 0.2  # the Linear head; embeddings stay dense


# --- 4. digests: the files' content in the stage keys -------------------------------------


def digest(dataset_name: str, args: dict, folder: Path, *, task: str = "classification") -> str | None:
    """The dataset's digest after its check, as validation computes it."""
    from compressflow.plugins import load_plugins

    dataset = load_plugins().datasets.get(dataset_name)
    params = dataset.Params.model_validate(args, context={"base_dir": folder})
    ctx = DataContext(DataSpec(dataset=dataset_name), 0, folder, "p.yaml:4", task)
    dataset.check(params, ctx)
    return dataset.digest(params, ctx)


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


def test_image_folder_digest_follows_names_sizes_and_mtimes_not_bytes(tmp_path):
    import os

    root = write_images(tmp_path / "images", per_class=2)
    args = {"root": "images"}
    before = digest("image-folder", args, tmp_path)
    assert digest("image-folder", args, tmp_path) == before
    image = root / "top" / "0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = digest("image-folder", args, tmp_path)
    assert touched != before
    (root / "top" / "0.png").rename(root / "top" / "9.png")
    assert digest("image-folder", args, tmp_path) != touched
