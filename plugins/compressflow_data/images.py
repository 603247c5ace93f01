"""The ``image-folder`` dataset: torchvision's ImageFolder layout from the user's files, one
subfolder per class.

This module imports neither numpy nor torch at import time (validation stays fast).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import Field, PositiveInt

from compressflow import ConfigError, DataBundle, DataInfo, DataPath, Dataset, DatasetParams
from compressflow.data import DataContext, file_digest
from compressflow.fingerprint import listing_digest
from compressflow_data.files import (
    IMAGE_EXTENSIONS,
    holdout_split,
    require_folder,
    source_text,
    tensor_bundle,
)


class ImageFolderParams(DatasetParams):
    """Images in one subfolder per class (torchvision's ImageFolder layout)."""

    root: DataPath = Field(description="the folder of class folders (relative: from the pipeline's folder)")
    test_root: DataPath | None = Field(
        None, description="a folder laid out the same, evaluated instead of a val_fraction split")
    size: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[height, width] every image is resized to; default: all must share one size")
    grayscale: bool = Field(False, description="one channel; default RGB, three")


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of ``root``, by sorted name (hidden ones skipped)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """Every image below ``folder``, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class ImageFolder(Dataset):
    """Images as float C,H,W in [0, 1], standardized per channel by the training split;
    class ``i`` is the ``i``-th class folder by sorted name."""

    Params = ImageFolderParams

    def check(self, params: ImageFolderParams, ctx: DataContext) -> None:
        expected = "a folder holding one subfolder of images per class"
        for key, root in (("root", params.root), ("test_root", params.test_root)):
            if root is None:
                continue
            require_folder(root, ctx, key, expected)
            if not class_folders(root):
                raise ConfigError(f"{ctx.place}: data.args.{key}: {root} has no class subfolders",
                                  f"{key} is {expected} (root/cat/1.png, root/dog/2.png)")

    def digest(self, params: ImageFolderParams, ctx: DataContext) -> str | None:
        """The class folders' names and every image's relative path, size and ``mtime_ns``
        (:func:`compressflow.fingerprint.listing_digest`), not the images' bytes: thousands
        of images are too many to read at every validation. An image rewritten with its
        size and modification time kept goes unseen (``touch`` it to be sure)."""
        parts = []
        for root in (params.root, params.test_root):
            if root is not None and not root.is_dir():
                return None
            folders = class_folders(root) if root is not None else []
            # the class names too: an empty class folder still counts as a class
            parts += ["/".join(f.name for f in folders),
                      listing_digest([p for f in folders for p in image_files(f)], root)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def load(self, params: ImageFolderParams, ctx: DataContext) -> DataBundle:
        import numpy as np

        self.check(params, ctx)
        classes = [p.name for p in class_folders(params.root)]
        if len(classes) < 2:
            raise ConfigError(f"{ctx.place}: {params.root} has one class folder ({classes[0]})",
                              "classification needs a subfolder per class, at least two")
        files, labels = self._listing(params.root, classes, classes, ctx, "root")
        size = tuple(params.size) if params.size else None
        x, size = self._read(files, params, size, ctx)
        y = np.array(labels, dtype=np.int64)
        if params.test_root is not None:
            test_classes = [p.name for p in class_folders(params.test_root)]
            test_files, y_val = self._listing(params.test_root, test_classes, classes, ctx, "test_root")
            x_val, _ = self._read(test_files, params, size, ctx, first=files[0])
            x_train, y_train, y_val = x, y, np.array(y_val, dtype=np.int64)
            every = files + test_files
        else:
            x_train, x_val, y_train, y_val = holdout_split(x, y, ctx, stratify=True)
            every = files
        names = hashlib.sha256()
        for root in (params.root, params.test_root):
            if root is not None:
                names.update("\n".join(str(p.relative_to(root)) for p in every
                                       if p.is_relative_to(root)).encode())
        digest = hashlib.sha256((file_digest(every, length=64) + names.hexdigest()).encode())
        sources = [params.root] + ([params.test_root] if params.test_root else [])
        info = DataInfo(name=f"image-folder:{params.root.name}", digest=digest.hexdigest()[:16],
                        source=source_text(sources, classes))
        return tensor_bundle(x_train, y_train, x_val, y_val, ctx, name="image-folder", info=info,
                             standardize=True, per_channel=True, num_classes=len(classes))

    @staticmethod
    def _listing(root: Path, folders: list[str], classes: list[str], ctx: DataContext, key: str):
        """``(files, labels)`` of a root whose class folders are ``folders``; labels index ``classes``."""
        unknown = [name for name in folders if name not in classes]
        if unknown:
            raise ConfigError(
                f"{ctx.place}: data.args.{key}: {root} has class folder(s) "
                f"{', '.join(map(repr, unknown))} that the training root lacks",
                f"the training classes are {', '.join(map(repr, classes))}")
        files, labels = [], []
        for name in folders:
            found = image_files(root / name)
            if not found and key == "root":
                raise ConfigError(f"{ctx.place}: class folder {root / name} holds no image",
                                  f"put {', '.join(IMAGE_EXTENSIONS[:3])} files in every class folder")
            files += found
            labels += [classes.index(name)] * len(found)
        if not files:
            raise ConfigError(f"{ctx.place}: data.args.{key}: {root} holds no image",
                              f"put {', '.join(IMAGE_EXTENSIONS[:3])} files in its class folders")
        return files, labels

    @staticmethod
    def _read(files: list[Path], params: ImageFolderParams, size: tuple[int, int] | None,
              ctx: DataContext, first: Path | None = None):
        """``(uint8 array N,C,H,W, (h, w))``: every image in one mode and size."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        mode = "L" if params.grayscale else "RGB"
        arrays, fixed = [], params.size is not None
        for path in files:
            try:
                with Image.open(path) as image:
                    image = image.convert(mode)
                    if size is None:
                        size, first = (image.height, image.width), path
                    if (image.height, image.width) != size:
                        if not fixed:
                            raise ConfigError(
                                f"{ctx.place}: {path} is {image.height}x{image.width} (h x w), but "
                                f"{first} is {size[0]}x{size[1]}",
                                "set data.args.size: [height, width] to resize every image, "
                                "or give all images one size")
                        image = image.resize((size[1], size[0]), Image.BILINEAR)
                    array = np.asarray(image, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as error:
                raise ConfigError(f"{ctx.place}: {path} cannot be read as an image: {error}",
                                  "remove the file, or replace it by a PNG or JPEG") from None
            arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        return np.stack(arrays).astype(np.float32) / 255.0, size
