"""Transforms: batch augmentation on the device (Kornia)."""

from popcorn.transforms.augmentation import BatchAugmentation

__all__ = ["BatchAugmentation"]
