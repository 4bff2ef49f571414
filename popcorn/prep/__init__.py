"""Data preparation: Sentinel composites from STAC (download) and census regions and counts."""
