"""Training-time augmentation, applied as the train loader's collate function.

Only the training split is augmented: evaluation, calibration and hold-out batches are the
images as stored. The random draws come from the train loader's own generator (the one its
shuffling uses), so :meth:`compressflow.DataBundle.reseed` restarts them with the stage's
seed and a stage's batches stay a function of its seed alone.
"""

from __future__ import annotations

from typing import Any


class RandomShift:
    """Stacks ``(image, target)`` samples and moves each image by up to ``pixels`` rows and
    columns (drawn uniformly and independently per image), the uncovered border filled
    with ``fill`` (the standardized value of a blank pixel).

    Args:
        pixels: the largest shift, in pixels, either way.
        fill: the value the uncovered border takes.
        image_shape: ``(channels, rows, cols)``; samples may be stored flat (``rows*cols``)
            and come back in the shape they came in.
        generator: the torch generator the loader shuffles with.
    """

    def __init__(self, pixels: int, fill: float, image_shape: tuple[int, int, int], generator: Any) -> None:
        self.pixels, self.fill = pixels, fill
        self.image_shape, self.generator = tuple(image_shape), generator

    def __call__(self, samples: list) -> list:
        from torch.utils.data import default_collate

        x, y = default_collate(samples)
        return [self.shift(x), y]

    def shift(self, x: Any) -> Any:
        """``x`` (a batch) with every image moved by its own random offset."""
        import torch
        import torch.nn.functional as F

        p = self.pixels
        channels, rows, cols = self.image_shape
        batch = x.shape[0]
        images = x.reshape(batch, channels, rows, cols)
        padded = F.pad(images, (p, p, p, p), value=self.fill)
        dy = torch.randint(0, 2 * p + 1, (batch,), generator=self.generator)
        dx = torch.randint(0, 2 * p + 1, (batch,), generator=self.generator)
        # one gather for the whole batch: row r of image b reads padded row r + dy[b]
        row_index = (torch.arange(rows)[None, :] + dy[:, None])[:, None, :, None]
        col_index = (torch.arange(cols)[None, :] + dx[:, None])[:, None, None, :]
        batch_index = torch.arange(batch)[:, None, None, None]
        channel_index = torch.arange(channels)[None, :, None, None]
        moved = padded[batch_index, channel_index, row_index, col_index]
        return moved.reshape(x.shape)
