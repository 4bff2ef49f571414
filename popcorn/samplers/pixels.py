"""Pixel samplers of popVAE: which valid pixels train, validate and test, and their batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from popcorn.errors import PopcornInputError

__all__ = ["PixelBatchSampler", "PixelSampler"]


class PixelSampler:
    """A random subset of valid pixels split into train / val / test (flat indices into H x W).

    ``fraction`` of the valid pixels (at most ``max_samples``) is drawn without replacement with
    ``seed``, then split by ``split`` (paper: 0.7, 0.15, 0.15). Everything is vectorised numpy.
    """

    def __init__(self, valid: np.ndarray, fraction: float = 1.0, max_samples: int | None = None,
                 split: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise PopcornInputError(f"sample_fraction must be in (0, 1], got {fraction}")
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
            raise PopcornInputError(f"split must be three non-negative fractions summing to 1, got {split}")
        self.shape = valid.shape
        candidates = np.flatnonzero(valid.ravel())
        n = int(round(fraction * candidates.size))
        if max_samples is not None:
            n = min(n, int(max_samples))
        if n < 3:
            raise PopcornInputError(
                f"only {candidates.size} valid pixels (non-empty patch, covariates present, reference "
                f"known); {n} sampled: too few to train")
        rng = np.random.default_rng(seed)
        chosen = rng.choice(candidates, size=n, replace=False)
        n_train = int(round(split[0] * n))
        n_val = int(round(split[1] * n))
        self.train = np.sort(chosen[:n_train])
        self.val = np.sort(chosen[n_train : n_train + n_val])
        self.test = np.sort(chosen[n_train + n_val :])
        self.n_valid = int(candidates.size)

    def rows_cols(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(idx, self.shape[1])


class PixelBatchSampler(Sampler):
    """Yields arrays of dataset positions (one array = one batch); reshuffled every epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n) if self.shuffle else np.arange(self.n)
        self.epoch += 1
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        for s in range(0, stop, self.batch_size):
            yield order[s : s + self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
