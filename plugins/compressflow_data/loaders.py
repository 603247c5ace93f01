"""Arrays to loaders: stratified splits, standardization, shapes, calibration batches."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Subset, TensorDataset

from compressflow import ConfigError, DataBundle, DataSpec

def load_digits_bundle(spec: DataSpec, seed: int, input_shape) -> DataBundle:
    """The digits as a bundle: flat (64) or image (1x8x8) to fit the model."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    image = spec.shape == "image" or (spec.shape == "auto" and input_shape is not None
                                       and len(input_shape) == 3)
    return make_bundle(features, labels, spec, seed, (1, 8, 8) if image else (64,))


def load_synthetic_bundle(spec: DataSpec, a, seed: int) -> DataBundle:
    """A make_classification task with the validated params ``a``."""
    from sklearn.datasets import make_classification

    if spec.shape == "image":
        raise ConfigError("dataset synthetic is flat; it has no image shape", "use shape: flat")
    features, labels = make_classification(
        n_samples=a.samples, n_features=a.features, n_informative=a.informative,
        n_redundant=0, n_classes=a.classes, n_clusters_per_class=a.clusters_per_class,
        class_sep=a.class_sep, flip_y=a.flip_y, random_state=seed)
    return make_bundle(features, labels, spec, seed, (a.features,))


def make_bundle(features: np.ndarray, labels: np.ndarray, spec: DataSpec, seed: int,
                sample_shape: tuple[int, ...]) -> DataBundle:
    """Split (stratified by seed), keep ``train_fraction`` of train, standardize, load."""
    try:
        x_train, x_val, y_train, y_val = train_test_split(
            features, labels, test_size=spec.val_fraction, stratify=labels, random_state=seed)
    except ValueError as error:  # a split with fewer samples than classes
        raise _split_error("val_fraction", spec.val_fraction, error) from None
    # statistics of the whole training split, so a smaller train_fraction sees the same scale
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-6] = 1.0  # a pixel blank in every training image must not blow up elsewhere
    if spec.train_fraction < 1.0:
        try:
            x_train, _, y_train, _ = train_test_split(
                x_train, y_train, train_size=spec.train_fraction, stratify=y_train,
                random_state=seed)
        except ValueError as error:
            raise _split_error("train_fraction", spec.train_fraction, error) from None

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        x = torch.tensor((x - mean) / std, dtype=torch.float32).reshape(-1, *sample_shape)
        return TensorDataset(x, torch.tensor(y, dtype=torch.long))

    train, val = tensors(x_train, y_train), tensors(x_val, y_val)
    generator = torch.Generator().manual_seed(seed)
    calibration_size = min(len(train), spec.calibration_batches * spec.batch_size)
    calibration_rows = torch.randperm(len(train), generator=generator)[:calibration_size]
    return DataBundle(
        train=DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=generator),
        val=DataLoader(val, batch_size=256),
        calibration=DataLoader(Subset(train, calibration_rows.tolist()), batch_size=spec.batch_size),
        num_classes=int(labels.max()) + 1,
        sample_shape=sample_shape,
    )


def _split_error(field: str, value: float, error: ValueError) -> ConfigError:
    return ConfigError(f"data.{field} {value:g} leaves a split too small: {error}",
                       "a stratified split needs at least one sample of every class on each side")
