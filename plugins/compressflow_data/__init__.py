"""Built-in datasets: ``digits`` (scikit-learn's bundled 8x8 digits), ``synthetic``, ``idx``
(MNIST-format files: ``make data`` fetches MNIST), and the user's own files: ``npz`` and
``csv`` (:mod:`compressflow_data.tabular`), ``image-folder`` (:mod:`compressflow_data.images`)
and ``text`` (:mod:`compressflow_data.text`).

Each is a :class:`compressflow.Dataset` with declared params, validated with the pipeline;
all read data in memory and never download anything.
"""

from __future__ import annotations

from pydantic import Field

from compressflow import ConfigError, DataPath, Dataset, DatasetParams, hookimpl


class Digits(Dataset):
    """scikit-learn's 1797 bundled 8x8 digits: stratified split, standardized, flat (64)
    or one 8x8 channel to fit the model."""


    def load(self, params, ctx):
        from compressflow_data.loaders import load_digits_bundle

        return load_digits_bundle(ctx.spec, ctx.seed, ctx.input_shape)


class SyntheticParams(DatasetParams):
    """sklearn.datasets.make_classification's settings."""

    samples: int = Field(2000, ge=10)
    features: int = Field(20, ge=1)
    classes: int = Field(4, ge=2)
    clusters_per_class: int = Field(3, ge=1)
    informative: int = Field(10, ge=1)
    class_sep: float = Field(1.0, gt=0)
    flip_y: float = Field(0.01, ge=0, le=1)


class Synthetic(Dataset):
    """A seeded Gaussian-mixture classification task, for fast tests and hard cases."""

    Params = SyntheticParams

    def load(self, params, ctx):
        from compressflow_data.loaders import load_synthetic_bundle

        return load_synthetic_bundle(ctx.spec, params, ctx.seed)


def digits(spec, seed: int = 0, input_shape=None):
    """The digits bundle for ``spec`` (a DataSpec), for scripts and benchmarks."""
    from compressflow_data.loaders import load_digits_bundle

    return load_digits_bundle(spec, seed, input_shape)


def synthetic(spec, seed: int = 0, input_shape=None):
    """The synthetic bundle for ``spec``, its ``args`` validated, for scripts and benchmarks."""
    from compressflow_data.loaders import load_synthetic_bundle

    return load_synthetic_bundle(spec, SyntheticParams.model_validate(spec.args), seed)


class IdxParams(DatasetParams):
    """Where the four idx files are, and how much of them to use."""

    root: DataPath = Field(description="folder with train-/t10k- images and labels (plain or .gz; "
                           "also root/raw, root/MNIST/raw); `make data` fetches MNIST to data/mnist")
    holdout: int = Field(0, ge=0, description="training images held out (stratified) for tuning")
    train_samples: int | None = Field(None, ge=1, description="use only the first N training images")
    test_samples: int | None = Field(None, ge=1, description="evaluate on the first N test images only")
    shift: int = Field(0, ge=0, le=8, description="augment the training images: move each by up "
                       "to N pixels either way at random, every epoch anew (0: as stored)")


class Idx(Dataset):
    """MNIST-format idx files: the official train/test split, the test images evaluated."""

    Params = IdxParams

    def check(self, params, ctx):
        from compressflow_data.idx import find_idx_files

        try:
            find_idx_files(params.root)
        except ConfigError as error:
            raise ConfigError(f"{ctx.place}: {error.message}", error.hint) from None

    def digest(self, params, ctx):
        """A sha256 of the four idx files (:func:`compressflow_data.idx.idx_digest`)."""
        from compressflow_data.idx import idx_digest

        return idx_digest(params.root)

    def load(self, params, ctx):
        from compressflow_data.idx import idx_bundle

        return idx_bundle(ctx.spec, params, ctx.seed, ctx.input_shape)


@hookimpl
def register_datasets(registry) -> None:
    """The built-in datasets."""
    registry.add("digits", Digits)
    registry.add("synthetic", Synthetic)
    registry.add("idx", Idx)
    from compressflow_data import images, tabular, text  # the user's own files

    registry.add("npz", tabular.Npz)
    registry.add("csv", tabular.Csv)
    registry.add("image-folder", images.ImageFolder)
    registry.add("text", text.Text)
