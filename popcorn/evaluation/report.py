"""Figures and an HTML report of an evaluation (matplotlib Agg; folium map, written offline).

- :func:`scatter_figure`: log-log scatter of predicted vs true counts per unit, values below 0.5
  gathered in one bin (as in the paper's figures);
- :func:`scale_factor_figure`: histogram of the dasymetric scale factors (10/50/90th percentiles);
- :func:`panels_figure`: side-by-side maps (prediction, built-up, occupancy, truth, ...);
- :func:`make_report`: ``index.html`` gathering the comparison table, the figures and an
  interactive map (folium / Leaflet) of the rasters as image overlays. Writing needs no network;
  viewing the interactive map loads Leaflet and the base map from their CDNs.
"""

from __future__ import annotations

import html
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from popcorn.errors import require
from popcorn.io import atomic_path

log = logging.getLogger(__name__)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (the 'report' extra), imported on first use."""
    matplotlib = require("matplotlib", "report")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "report")

LOW = 0.5
"""Counts below this go to one bin at the low end of the log axes."""
MAX_PANEL_PX = 800


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _log_clip(x: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(x, dtype=np.float64), LOW))


def scatter_figure(predictions: dict[str, np.ndarray], truth: np.ndarray, path: str | os.PathLike[str],
                   metrics: dict[str, dict[str, float]] | None = None) -> Path:
    """Log-log density scatter (2-D histogram) of predicted vs true counts, one panel per map."""
    n = len(predictions)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    t = _log_clip(truth)
    hi = max([t.max(initial=0)] + [_log_clip(p).max(initial=0) for p in predictions.values()]) + 0.1
    lo = math.log10(LOW) - 0.05
    bins = np.linspace(lo, hi, 80)
    for ax, (name, pred) in zip(axes.ravel(), predictions.items(), strict=False):
        p = _log_clip(pred)
        hist, xe, ye = np.histogram2d(t, p, bins=[bins, bins])
        ax.pcolormesh(xe, ye, np.ma.masked_equal(hist.T, 0), cmap="viridis",
                      norm=_pyplot().matplotlib.colors.LogNorm(vmin=1, vmax=max(hist.max(), 1)))
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
        ticks = [v for v in (0.5, 1, 10, 100, 1000, 10000) if math.log10(v) <= hi]
        ax.set_xticks([math.log10(v) for v in ticks], ["<0.5" if v == 0.5 else f"{v:g}" for v in ticks])
        ax.set_yticks([math.log10(v) for v in ticks], ["<0.5" if v == 0.5 else f"{v:g}" for v in ticks])
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("true count per unit")
        ax.set_ylabel("predicted count per unit")
        title = name
        if metrics and name in metrics:
            m = metrics[name]
            title += f"\nR²={m['r2']:.2f}  MAE={m['mae']:.2f}  RMSE={m['rmse']:.2f}"
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))


def scale_factor_figure(scale_factors_csv: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Histogram of the per-region scale factors (count / predicted) with p10/p50/p90."""
    import pandas as pd

    f = pd.read_csv(scale_factors_csv)["scale_factor"].to_numpy(dtype=float)
    f = f[np.isfinite(f) & (f > 0)]
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.6))
    if f.size:
        bins = np.logspace(np.log10(f.min()) - 0.05, np.log10(f.max()) + 0.05, 40)
        ax.hist(f, bins=bins, color="#4c72b0")
        ax.set_xscale("log")
        for q, v in zip((10, 50, 90), np.percentile(f, [10, 50, 90]), strict=True):
            ax.axvline(v, color="k", ls=":" if q != 50 else "-", lw=1)
            ax.text(v, ax.get_ylim()[1] * 0.95, f" p{q}={v:.2f}", fontsize=8, va="top")
    ax.set_xlabel("scale factor (census count / predicted sum)")
    ax.set_ylabel("regions")
    ax.set_title(f"Dasymetric scale factors ({f.size} regions)", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def read_preview(path: str | os.PathLike[str], max_px: int = MAX_PANEL_PX) -> tuple[np.ndarray, Any, Any]:
    """A decimated read of band 1 (NaN = nodata), its bounds and CRS (uses overviews if any)."""
    with rasterio.open(path) as src:
        scale = max(1, math.ceil(max(src.width, src.height) / max_px))
        shape = (max(1, src.height // scale), max(1, src.width // scale))
        resampling = rasterio.enums.Resampling.average if scale > 1 else rasterio.enums.Resampling.nearest
        data = src.read(1, out_shape=shape, resampling=resampling, masked=True).astype(np.float64)
        return data.filled(np.nan), src.bounds, src.crs


def panels_figure(panels: dict[str, str], path: str | os.PathLike[str]) -> Path:
    """Side-by-side map panels; population-like panels on a log colour scale."""
    n = len(panels)
    fig, axes = _pyplot().subplots(1, n, figsize=(4.0 * n, 4.2), squeeze=False)
    for ax, (name, raster) in zip(axes[0], panels.items(), strict=True):
        data, bounds, _ = read_preview(raster)
        extent = (bounds.left, bounds.right, bounds.bottom, bounds.top)
        lower = name.lower()
        if "built" in lower:
            im = ax.imshow(data, extent=extent, cmap="magma", vmin=0, vmax=1)
        elif "occup" in lower:
            im = ax.imshow(data, extent=extent, cmap="cividis", vmin=0, vmax=np.nanpercentile(data, 99) if np.isfinite(data).any() else 1)
        else:
            finite = data[np.isfinite(data) & (data > 0)]
            vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
            im = ax.imshow(np.where(data > 0, data, np.nan), extent=extent, cmap="inferno",
                           norm=_pyplot().matplotlib.colors.LogNorm(vmin=max(vmax / 1e3, 1e-3), vmax=max(vmax, 1e-2)))
            ax.set_facecolor("black")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return _save(fig, Path(path))


def _overlay_png(raster: str, path: Path, cmap: str, log_scale: bool) -> tuple[Path, list[list[float]]]:
    from rasterio.warp import transform_bounds

    data, bounds, crs = read_preview(raster, 1000)
    finite = np.isfinite(data)
    if log_scale:
        pos = data[finite & (data > 0)]
        vmax = float(np.percentile(pos, 99.5)) if pos.size else 1.0
        norm = _pyplot().matplotlib.colors.LogNorm(vmin=max(vmax / 1e3, 1e-3), vmax=max(vmax, 1e-2))
        values = np.where(finite & (data > 0), data, np.nan)
    else:
        norm = _pyplot().matplotlib.colors.Normalize(0, 1)
        values = data
    rgba = _pyplot().get_cmap(cmap)(norm(np.ma.masked_invalid(values)))
    rgba[..., 3] = np.where(np.isfinite(values), 0.8, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _pyplot().imsave(tmp, rgba)
    west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds)
    return path, [[south, west], [north, east]]


def interactive_map(layers: dict[str, str], path: str | os.PathLike[str]) -> Path | None:
    """A folium (Leaflet) map with each raster as a toggleable image overlay (north-up preview)."""
    try:
        import folium
    except ImportError:  # the 'report' extra
        log.warning("folium is not installed (pip install 'popcorn[report]'); no interactive map")
        return None
    path = Path(path)
    fmap = None
    for i, (name, raster) in enumerate(layers.items()):
        lower = name.lower()
        cmap, log_scale = ("magma", False) if "built" in lower else ("inferno", True)
        png, bounds = _overlay_png(raster, path.parent / f"layer_{i}.png", cmap, log_scale)
        if fmap is None:
            centre = [(bounds[0][0] + bounds[1][0]) / 2, (bounds[0][1] + bounds[1][1]) / 2]
            fmap = folium.Map(location=centre, zoom_start=12, tiles="OpenStreetMap", control_scale=True)
            fmap.fit_bounds(bounds)
        folium.raster_layers.ImageOverlay(image=str(png), bounds=bounds, name=name, opacity=0.8,
                                          show=i == 0).add_to(fmap)
    if fmap is None:
        return None
    folium.LayerControl(collapsed=False).add_to(fmap)
    with atomic_path(path) as tmp:
        fmap.save(str(tmp))
    return path


def make_report(
    evaluation: Any, out_dir: str | os.PathLike[str], *, maps: dict[str, str] | None = None,
    scale_factors: str | os.PathLike[str] | None = None, panels: dict[str, str] | None = None,
    title: str = "Population map evaluation", notes: str = "",
) -> Path:
    """Write figures and ``index.html`` into ``out_dir``; return the HTML path."""
    from popcorn.evaluation.compare import format_comparison

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    scatter = scatter_figure(evaluation.predictions, evaluation.truth, out / "scatter.png", evaluation.metrics)
    figures.append(("Predicted vs true counts per unit (log-log; values below 0.5 in one bin)", scatter.name))
    if scale_factors and Path(scale_factors).exists():
        sf = scale_factor_figure(scale_factors, out / "scale_factors.png")
        figures.append(("Dasymetric scale factors per census region", sf.name))
    if panels:
        pf = panels_figure(panels, out / "panels.png")
        figures.append(("Maps side by side", pf.name))
    layers = dict(panels or {})
    for name, path in (maps or {}).items():
        layers.setdefault(name, path)
    imap = interactive_map(layers, out / "map.html") if layers else None

    rows = "".join(
        "<tr>" + f"<td>{html.escape(name)}</td>" + "".join(
            f"<td>{v}</td>" for v in (f"{m['r2']:.3f}", f"{m['mae']:.2f}", f"{m['rmse']:.2f}",
                                      f"{m['total_pred']:,.0f}", f"{m['total_true']:,.0f}", f"{int(m['units']):,}",
                                      f"{evaluation.missing.get(name, 0):,}")) + "</tr>"
        for name, m in evaluation.metrics.items()
    )
    fig_html = "".join(f"<figure><img src='{src}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}"
                       f"</figcaption></figure>" for cap, src in figures)
    map_html = (f"<h2>Interactive map</h2><iframe src='{imap.name}' style='width:100%;height:560px;border:0'></iframe>"
                if imap else "")
    files = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in (maps or {}).items())
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Reference: {html.escape(evaluation.reference)}. Metrics as in Metzger et al. (RSE 2024): R² = 1 − Σ(p − p̂)² / Σ(p − p̄)²,
MAE, RMSE over the fine units; totals over the same units.</p>
{f'<p>{html.escape(notes)}</p>' if notes else ''}
<table><tr><th>method</th><th>R²</th><th>MAE</th><th>RMSE</th><th>total predicted</th><th>total true</th><th>units</th><th>missing units</th></tr>
{rows}</table>
<pre>{html.escape(format_comparison(evaluation))}</pre>
{fig_html}
{map_html}
<h2>Files</h2><ul>{files}</ul>
</body></html>
"""
    index = out / "index.html"
    with atomic_path(index) as tmp:
        tmp.write_text(doc)
    return index


__all__ = ["interactive_map", "make_report", "panels_figure", "scale_factor_figure", "scatter_figure"]
