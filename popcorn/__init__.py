"""popcorn: fine-scale (1 ha) population maps from Sentinel-1/2 imagery and coarse census counts."""

__version__ = "0.1.0"
