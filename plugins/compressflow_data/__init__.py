"""Built-in datasets: ``digits`` (scikit-learn's bundled 8x8 digits) and ``synthetic``.

Both are real data in memory, need no network, and split by the pipeline's seed.
"""

from __future__ import annotations

from compressflow import hookimpl


def digits(spec, seed, input_shape):
    """scikit-learn's 1797 bundled 8x8 digits, stratified split, standardized."""
    from compressflow_data.loaders import load_digits_bundle

    return load_digits_bundle(spec, seed, input_shape)


def synthetic(spec, seed, input_shape):
    """A seeded Gaussian-mixture classification task (args: samples, features, classes,
    clusters_per_class, informative, class_sep, flip_y), for fast tests and hard cases."""
    from compressflow_data.loaders import load_synthetic_bundle

    return load_synthetic_bundle(spec, seed, input_shape)


@hookimpl
def register_datasets(registry) -> None:
    """The two built-in datasets."""
    registry.add("digits", digits)
    registry.add("synthetic", synthetic)
