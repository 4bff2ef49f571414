"""Evaluation: metrics, dasymetric rescaling, baselines, map comparison and the HTML report."""
