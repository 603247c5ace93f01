"""compressflow_data.images: the image-folder dataset from the user's files.

Every image is written here, small; pipelines run through the CLI into one sqlite store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.plugins.data.conftest import assert_learned, assert_one_error, digest, load, pipeline


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


# --- whole pipelines, no plugin code -----------------------------------------------------


def test_image_folder_pipeline_learns_with_a_cnn(tmp_path, elsewhere, shared_store, cli):
    project = tmp_path / "project"
    write_images(project / "images")
    cnn = {"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 3}}
    path = pipeline(project, {"dataset": "image-folder", "batch_size": 16,
                              "args": {"root": "images", "grayscale": True}},
                    cnn, name="images-halves")
    result = cli("run", path, "--tracking-uri", shared_store, "--quiet")
    assert_learned(result, shared_store, "images-halves")


# --- bad input: exit 2, one message at its line, no traceback ----------------------------


def test_images_of_mixed_sizes_without_size_stop_the_run(tmp_path, elsewhere, cli):
    write_images(tmp_path / "images", per_class=3, odd_size=True)
    cnn = {"source": "zoo:cnn", "args": {"channels": [4, 8], "hidden": 16, "num_classes": 3}}
    path = pipeline(tmp_path, {"dataset": "image-folder",
                               "args": {"root": "images", "grayscale": True}}, cnn, name="sizes")
    result = cli("run", path, "--tracking-uri", f"sqlite:///{tmp_path / 'db.db'}", "--quiet")
    assert_one_error(result, "odd.png", "9x8", "size")


# --- the datasets directly ---------------------------------------------------------------


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


# --- digests: the files' content in the stage keys ---------------------------------------


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
