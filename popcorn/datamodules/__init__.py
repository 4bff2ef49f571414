"""Lightning data modules: census weak supervision, built-up training and adaptation, occupancy
pretraining, popVAE.

Names are imported lazily, so that naming one data module in a config does not import the others.
"""

from __future__ import annotations

from popcorn import lazy_exports

_SUBMODULE = {
    "BuiltUpDataModule": "builtup",
    "SyntheticBuiltUpDataModule": "builtup",
    "CensusDataModule": "census",
    "SyntheticCensusDataModule": "census",
    "split_ids": "census",
    "PixelDataModule": "pixel",
    "PopulationDataModule": "population",
    "SyntheticPixelDataModule": "pixel",
}

__all__ = sorted(_SUBMODULE)


__getattr__, __dir__ = lazy_exports(__name__, _SUBMODULE)
