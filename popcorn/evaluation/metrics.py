"""Evaluation metrics as the POPCORN paper defines them: R^2, MAE and RMSE over fine units."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _pair(pred: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} values but the reference has {t.size}")
    if p.size == 0:
        raise ValueError("no units to evaluate: the prediction and the reference are empty")
    return p, t


def r2_score(pred: ArrayLike, true: ArrayLike) -> float:
    """Coefficient of determination 1 - sum (p - p_hat)^2 / sum (p - mean p)^2 (p = truth)."""
    p, t = _pair(pred, true)
    ss_tot = np.sum((t - t.mean()) ** 2)
    if ss_tot == 0:
        return float("nan")
    return float(1.0 - np.sum((t - p) ** 2) / ss_tot)


def mae(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute error (people per unit)."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def rmse(pred: ArrayLike, true: ArrayLike) -> float:
    """Root mean squared error (people per unit)."""
    p, t = _pair(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def regression_metrics(pred: ArrayLike, true: ArrayLike) -> dict[str, float]:
    """R^2, MAE, RMSE plus the totals and the number of units, as reported in tables."""
    p, t = _pair(pred, true)
    return {
        "r2": r2_score(p, t),
        "mae": mae(p, t),
        "rmse": rmse(p, t),
        "total_pred": float(p.sum()),
        "total_true": float(t.sum()),
        "units": float(p.size),
    }


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """Markdown table of ``{method: regression_metrics(...)}``."""
    lines = [title, ""] if title else []
    lines.append("| method | R^2 | MAE | RMSE | total predicted | total true | units |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['r2']:.3f} | {m['mae']:.2f} | {m['rmse']:.2f} | "
            f"{m['total_pred']:,.0f} | {m['total_true']:,.0f} | {int(m['units']):,} |"
        )
    return "\n".join(lines)
