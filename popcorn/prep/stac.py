"""STAC side of ``popcorn download``: catalogs, signing, item search and filtering, L1C <-> L2A pairing, DN offsets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timezone
from typing import Any

from popcorn.errors import PopcornInputError, require
from popcorn.prep.download_config import (
    L1C_MAX_TIME_DIFF_S,
    S2CLOUDLESS_BANDS,
    DownloadConfig,
    _is_transient,
    season_datetime,
    with_retries,
)


# ---------------------------------------------------------------------------- STAC
def _signer(cfg: DownloadConfig, url: str | None = None) -> Callable[[str], str] | None:
    """URL signer for the assets of the STAC API ``url`` (default ``cfg.stac_url``)."""
    url = url or cfg.stac_url
    use = cfg.sign == "planetary-computer" or (
        cfg.sign == "auto" and "planetarycomputer.microsoft.com" in url
    )
    if not use:
        return None
    try:
        import planetary_computer
    except ImportError as err:
        raise PopcornInputError(
            f"{url} (Microsoft Planetary Computer) needs signed asset URLs: install popcorn's 'download' "
            "extra (pip install 'popcorn[download]', or pip install planetary-computer) or use --sign none "
            "with another STAC API"
        ) from err
    return planetary_computer.sign


def open_catalog(cfg: DownloadConfig, url: str | None = None):  # noqa: ANN201 - pystac_client.Client
    pystac_client = require("pystac_client", "download")

    url = url or cfg.stac_url

    def _open():
        return pystac_client.Client.open(url)

    try:
        return with_retries(_open, f"opening the STAC API {url}", cfg.retries, cfg.retry_delay)
    except PopcornInputError:
        raise
    except Exception as err:
        raise PopcornInputError(f"cannot open the STAC API {url} ({err})") from err


def check_collection(client: Any, collection: str, cfg: DownloadConfig, url: str | None = None) -> None:
    """Raise a PopcornInputError naming the collection (and the ones available) if unknown."""
    def _get():
        try:
            return client.get_collection(collection)
        except Exception as err:  # noqa: BLE001
            if _is_transient(err) and "404" not in str(err):
                raise
            return None

    found = with_retries(_get, f"looking up collection {collection}", cfg.retries, cfg.retry_delay)
    if found is None:
        try:
            available = sorted(c.id for c in client.get_collections())
        except Exception:  # noqa: BLE001
            available = []
        hint = f"; available: {available[:30]}" if available else ""
        raise PopcornInputError(f"collection {collection!r} not found at {url or cfg.stac_url}{hint}")


def search_items(client: Any, collection: str, bbox: Sequence[float], season: str,
                 cfg: DownloadConfig) -> list[Any]:
    """Items of ``collection`` intersecting ``bbox`` during ``season`` (with retries)."""
    datetime = season_datetime(season, cfg.year)

    def _search():
        search = client.search(collections=[collection], bbox=list(bbox), datetime=datetime,
                               limit=500)
        return list(search.items())

    items = with_retries(_search, f"searching {collection} ({season})", cfg.retries, cfg.retry_delay)
    return sorted(items, key=lambda it: (str(it.datetime), it.id))


def filter_items(items: Sequence[Any], sensor: str, cfg: DownloadConfig) -> tuple[list[Any], list[str]]:
    """Keep the items a composite can use; return them and notes on what was dropped."""
    notes: list[str] = []
    keep = []
    assets = cfg.s2_assets if sensor == "s2" else cfg.s1_assets
    needed = list(assets)
    if sensor == "s2" and cfg.cloud_mask == "s2cloudless":
        needed = list(assets[:4])
    missing_assets = cloudy = orbit = no_orbit = 0
    for it in items:
        if any(a not in it.assets for a in needed):
            missing_assets += 1
            continue
        if sensor == "s2":
            cc = it.properties.get("eo:cloud_cover")
            if cc is not None and cc > cfg.max_cloud_cover:
                cloudy += 1
                continue
        if sensor == "s1" and cfg.s1_orbit != "both":
            state = str(it.properties.get("sat:orbit_state", "")).lower()
            if not state:
                no_orbit += 1
                continue
            if state != cfg.s1_orbit:
                orbit += 1
                continue
        keep.append(it)
    if missing_assets:
        notes.append(f"{missing_assets} item(s) without the assets {needed}")
    if cloudy:
        notes.append(f"{cloudy} item(s) above --max-cloud-cover {cfg.max_cloud_cover}")
    if orbit:
        notes.append(f"{orbit} item(s) not in orbit {cfg.s1_orbit} (--s1-orbit)")
    if no_orbit:
        notes.append(f"{no_orbit} item(s) without sat:orbit_state, needed by --s1-orbit {cfg.s1_orbit} "
                     "(use --s1-orbit both for this collection)")
    return keep, notes


# ---------------------------------------------------------------------------- L1C <-> L2A
_S2_PRODUCT = re.compile(
    r"(S2[A-D])_MSI(?:L1C|L2A)_(\d{8}T\d{6})_(?:N(\d{4})_)?R(\d{3})_T(\d{2}[C-X][A-Z]{2})"
)


_S2_TILE = re.compile(r"(?:^|[_-])T?(\d{2}[C-X][A-Z]{2})(?=[_.-]|$)")


@dataclasses.dataclass(frozen=True)
class SceneKey:
    """What identifies one Sentinel-2 acquisition of one MGRS tile, in L1C and L2A alike."""

    tile: str | None
    time: datetime
    platform: str | None = None
    orbit: int | None = None
    from_product_id: bool = False


def s2_scene_key(item: Any) -> SceneKey:
    """Tile, sensing time, platform and relative orbit of an S2 STAC item.

    From the product id (``S2B_MSIL2A_20200601T101559_N0212_R065_T32TMT_...``, in
    ``s2:product_uri`` or the item id) when there is one; otherwise from the properties
    (``s2:mgrs_tile``, ``grid:code``, ``mgrs:*``, ``platform``, ``sat:relative_orbit``) and the
    item's datetime.
    """
    props = item.properties
    for text in (props.get("s2:product_uri"), props.get("s2:product_id"), item.id):
        m = _S2_PRODUCT.search(str(text or ""))
        if m:
            return SceneKey(m[5], datetime.strptime(m[2], "%Y%m%dT%H%M%S"), m[1], int(m[4]), True)
    tile = props.get("s2:mgrs_tile") or props.get("mgrs:tile")
    code = str(props.get("grid:code") or "")
    if not tile and code.upper().startswith("MGRS-"):
        tile = code[5:]
    if not tile and props.get("mgrs:utm_zone") is not None:
        tile = (f"{int(props['mgrs:utm_zone']):02d}{props.get('mgrs:latitude_band', '')}"
                f"{props.get('mgrs:grid_square', '')}")
    if not tile:
        m = _S2_TILE.search(str(item.id))
        tile = m[1] if m else None
    if tile:
        tile = str(tile).upper().lstrip("T")
        tile = "0" + tile if len(tile) == 4 else tile
    platform = str(props.get("platform") or "").lower()
    platform = f"S2{platform[-1].upper()}" if re.fullmatch(r"sentinel-2[a-d]", platform) else None
    orbit = props.get("sat:relative_orbit")
    dt = item.datetime
    if dt is not None and dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return SceneKey(tile, dt, platform, int(orbit) if orbit is not None else None, False)


def _scene_gap(a: SceneKey, b: SceneKey) -> float | None:
    """Seconds between two scene keys if they can be the same acquisition, else None."""
    if a.tile is None or a.tile != b.tile or a.time is None or b.time is None:
        return None
    if a.platform and b.platform and a.platform != b.platform:
        return None
    if a.orbit is not None and b.orbit is not None and a.orbit != b.orbit:
        return None
    gap = abs((a.time - b.time).total_seconds())
    if a.from_product_id and b.from_product_id:  # both datatake sensing times: must be equal
        return gap if gap < 1.0 else None
    return gap if gap <= L1C_MAX_TIME_DIFF_S else None


def pair_l1c(l2a_items: Sequence[Any], l1c_items: Sequence[Any],
             assets: Sequence[str]) -> tuple[list[Any | None], dict[str, str]]:
    """The L1C item of the same acquisition for every L2A item (None where there is none).

    Among the L1C items of the same tile (and platform and relative orbit, when known), the one
    closest in time wins: equal sensing times when both have product ids, else at most
    :data:`L1C_MAX_TIME_DIFF_S` apart. Candidates lacking one of ``assets`` are not used.
    Returns the pairs and, per unmatched L2A item id, why.
    """
    keys = [(s2_scene_key(it), it) for it in l1c_items]
    out: list[Any | None] = []
    why: dict[str, str] = {}
    for item in l2a_items:
        key = s2_scene_key(item)
        if key.tile is None:
            out.append(None)
            why[item.id] = "no MGRS tile in its id or properties"
            continue
        found = sorted(
            ((gap, cand) for k, cand in keys if (gap := _scene_gap(key, k)) is not None),
            key=lambda gc: (gc[0], gc[1].id),
        )
        usable = [c for _, c in found if all(a in c.assets for a in assets)]
        out.append(usable[0] if usable else None)
        if not found:
            why[item.id] = f"no L1C item of tile {key.tile} at {key.time:%Y-%m-%dT%H:%M:%S}"
        elif not usable:
            lacking = sorted({a for _, c in found for a in assets if a not in c.assets})
            why[item.id] = f"its L1C item {found[0][1].id} lacks the asset(s) {lacking}"
    return out, why


def find_l1c(client: Any, items: Sequence[Any], bbox: Sequence[float], season: str,
             cfg: DownloadConfig, url: str) -> list[Any]:
    """The L1C item of every L2A item (same order), or a PopcornInputError naming the scenes
    that have none."""
    found = search_items(client, cfg.l1c_collection, bbox, season, cfg)
    pairs, why = pair_l1c(items, found, cfg.l1c_assets)
    if why:
        listed = "; ".join(f"{iid} ({reason})" for iid, reason in list(why.items())[:20])
        more = f"; ... ({len(why)} in total)" if len(why) > 20 else ""
        raise PopcornInputError(
            f"--cloud-mask s2cloudless: {len(why)} of {len(items)} {cfg.s2_collection!r} scene(s) "
            f"of {season} {cfg.year} have no matching {cfg.l1c_collection!r} scene at {url}: "
            f"{listed}{more}. s2cloudless needs the L1C bands {' '.join(S2CLOUDLESS_BANDS)} of "
            "the same acquisition (same MGRS tile and sensing time). Point --l1c-stac-url / "
            "--l1c-collection (and --l1c-assets) at a catalogue that has them, drop those scenes "
            "(e.g. --max-cloud-cover), or use --cloud-mask scl."
        )
    return pairs


S2_DN_OFFSET = -1000.0
"""BOA_ADD_OFFSET (L2A) / RADIO_ADD_OFFSET (L1C) of processing baseline 04.00 and later:
reflectance x 1e4 = DN - 1000 (DN 0 stays no data)."""


S2_OFFSET_BASELINE = 4.0


S2_OFFSET_START = date(2022, 1, 25)
"""First acquisition day of baseline 04.00; decides only for items without any baseline."""


_BOA_APPLIED_KEYS = ("earthsearch:boa_offset_applied", "sentinel:boa_offset_applied")


def _parse_baseline(value: Any) -> float | None:
    """``"04.00"``, ``4.0``, ``"N0400"`` or ``"0400"`` -> 4.0; None if unreadable."""
    if value is None:
        return None
    text = str(value).strip().upper().removeprefix("N")
    try:
        return int(text) / 100 if re.fullmatch(r"\d{4}", text) else float(text)
    except ValueError:
        return None


def s2_dn_offset(item: Any) -> tuple[float, str]:
    """DN offset of a Sentinel-2 (L2A or L1C) STAC item and where it was read from.

    One rule: the offset is :data:`S2_DN_OFFSET` (-1000) when the product's processing
    baseline is 04.00 or later, else 0. The baseline is the ``s2:processing_baseline``
    (or ``sentinel:processing_baseline``) property, else the ``N####`` of the product id
    (``s2:product_uri``, ``s2:product_id`` or the item id). An item with neither is assumed
    by its acquisition date (on or after 2022-01-25: offset). Exception: a catalogue that
    already removed the offset from its files says so with ``earthsearch:boa_offset_applied``
    (Earth Search) = true -> 0. ``raster:bands`` ``offset``/``scale`` are not used (Earth
    Search's disagree with its files for many scenes; the Planetary Computer has none).

    Returns ``(offset, source)`` with source ``"baseline"``, ``"product id"``,
    ``"already removed"`` or ``"date"``.
    """
    props = item.properties
    if any(str(props.get(k)).lower() == "true" for k in _BOA_APPLIED_KEYS):
        return 0.0, "already removed"
    baseline, source = None, "baseline"
    for key in ("s2:processing_baseline", "sentinel:processing_baseline"):
        baseline = _parse_baseline(props.get(key))
        if baseline is not None:
            break
    if baseline is None:
        source = "product id"
        for text in (props.get("s2:product_uri"), props.get("s2:product_id"), item.id):
            m = _S2_PRODUCT.search(str(text or ""))
            if m and m[3]:
                baseline = _parse_baseline(m[3])
                break
    if baseline is not None:
        return (S2_DN_OFFSET if baseline >= S2_OFFSET_BASELINE else 0.0), source
    dt = item.datetime
    if dt is None:
        from pystac.utils import str_to_datetime

        dt = str_to_datetime(props["start_datetime"])
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return (S2_DN_OFFSET if dt.date() >= S2_OFFSET_START else 0.0), "date"


def _offset_summary(items: Sequence[Any]) -> tuple[int, list[str]]:
    """How many of ``items`` have the DN offset, and the ids of those decided by date."""
    found = [(it.id, *s2_dn_offset(it)) for it in items]
    return sum(off != 0 for _, off, _ in found), [iid for iid, _, src in found if src == "date"]


def _stac_cfg(cfg: DownloadConfig) -> dict:
    s2 = {a: {"data_type": "uint16", "nodata": 0} for a in cfg.s2_assets[:4]}
    s2[cfg.s2_assets[4]] = {"data_type": "uint8", "nodata": 0}
    s1 = {a: {"data_type": "float32", "nodata": float("nan")} for a in cfg.s1_assets}
    out = {cfg.s2_collection: {"assets": s2}, cfg.s1_collection: {"assets": s1}}
    if cfg.cloud_mask == "s2cloudless":
        out[cfg.l1c_collection] = {"assets": {a: {"data_type": "uint16", "nodata": 0} for a in cfg.l1c_assets}}
    return out


def _solar_days(items: Iterable[Any]) -> int:
    days = set()
    for it in items:
        dt = it.datetime
        lon = 0.0
        if it.bbox:
            lon = (it.bbox[0] + it.bbox[2]) / 2
        if dt is not None:
            days.add((dt.timestamp() + lon / 15 * 3600) // 86400)
    return max(len(days), 1)


def _bbox_intersects(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])
