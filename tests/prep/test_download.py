"""popcorn.prep.download against a local STAC API (no internet).

A threaded http.server on 127.0.0.1 serves a minimal STAC API (landing page, conformance,
collections, /search with bbox/datetime/collection filtering, GET and POST) and the scenes as
small Cloud-Optimized GeoTIFFs with HTTP range requests. It stops itself after a deadline.

The scenes (UTM 32N, around 9.0 E 45.0 N):
- sentinel-2-l2a: 4 summer scenes + 1 autumn scene; B02..B08 uint16 at 10 m with nodata
  pixels, SCL uint8 at 20 m with clouds (9), shadows (3), cirrus (10) and clear classes.
- sentinel-1-rtc: 3 summer scenes (2 ascending, 1 descending; one at 20 m), VV/VH linear
  power float32 with NaN holes.
- sentinel-2-l1c: the L1C scenes of the 4 summer L2A scenes (two found by product id, two by
  tile + platform + orbit + time, as Earth Search items are), each with a cloud that
  s2cloudless finds, plus two all-cloud decoys that must not be paired (next day; same time
  but another platform and orbit). Their 10 bands are constant on the 60 m blocks of the
  output grid, so the averaged 60 m input of the detector is known exactly here.
Expected composites are computed here with numpy, independently of the download code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from popcorn.cli import download as dl_cli
from popcorn.errors import PopcornInputError
from popcorn.prep import composite as dl_comp
from popcorn.prep import download as dl
from popcorn.prep import download_config as dl_cfg
from popcorn.prep import stac as dl_stac

BBOX = (9.0, 45.0, 9.008, 45.006)
MARGIN = 200.0  # m of scene beyond the output grid
SCL_MASK = (0, 1, 3, 8, 9, 10)
S2C_FACTOR = 6  # --s2cloudless-res 60 m on the 10 m grid
# L1C top-of-atmosphere reflectance of B01 B02 B04 B05 B08 B8A B09 B10 B11 B12
CLEAR_TOA = np.array([0.12, 0.08, 0.05, 0.10, 0.30, 0.32, 0.10, 0.002, 0.18, 0.09])
CLOUD_TOA = np.array([0.45, 0.42, 0.41, 0.43, 0.47, 0.47, 0.16, 0.03, 0.33, 0.22])
CLOUD_BLOCKS = [(1, 4, 1, 4), (6, 10, 4, 8), (3, 6, 7, 11), (9, 13, 0, 4)]  # 60 m blocks r0 r1 c0 c1


# ---------------------------------------------------------------------------- the STAC server
class StacServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[dict] = []
        self.collections = {"sentinel-2-l2a": {}, "sentinel-1-rtc": {}, "sentinel-2-l1c": {}}
        self.fail = {"search": 0, "data": 0}
        self.requests = {"search": 0, "data": 0}
        self.lock = threading.Lock()
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.deadline = threading.Timer(300, self.httpd.shutdown)  # stops itself
        self.deadline.daemon = True

    def start(self) -> StacServer:
        self.thread.start()
        self.deadline.start()
        return self

    def stop(self) -> None:
        self.deadline.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def _take_failure(self, kind: str) -> bool:
        with self.lock:
            self.requests[kind] += 1
            if self.fail[kind] > 0:
                self.fail[kind] -= 1
                return True
        return False

    def search(self, params: dict) -> dict:
        cols = params.get("collections")
        if isinstance(cols, str):
            cols = cols.split(",")
        bbox = params.get("bbox")
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        dt = params.get("datetime")
        start = end = None
        if dt:
            a, _, b = dt.partition("/")
            start = None if a in ("", "..") else a.replace("Z", "")
            end = None if b in ("", "..") else b.replace("Z", "")
        out = []
        for it in self.items:
            if cols and it["collection"] not in cols:
                continue
            ib = it["bbox"]
            if bbox and (ib[2] < bbox[0] or bbox[2] < ib[0] or ib[3] < bbox[1] or bbox[3] < ib[1]):
                continue
            t = it["properties"]["datetime"].replace("Z", "")
            if (start and t < start) or (end and t > end):
                continue
            out.append(it)
        return {"type": "FeatureCollection", "features": out, "links": []}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _fail(self):
                body = b"busy"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _landing(self):
                u = server.url
                return {
                    "type": "Catalog", "id": "test", "description": "local test STAC API",
                    "stac_version": "1.0.0",
                    "conformsTo": [
                        "https://api.stacspec.org/v1.0.0/core",
                        "https://api.stacspec.org/v1.0.0/item-search",
                        "https://api.stacspec.org/v1.0.0/collections",
                        "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
                    ],
                    "links": [
                        {"rel": "self", "href": u + "/", "type": "application/json"},
                        {"rel": "root", "href": u + "/", "type": "application/json"},
                        {"rel": "search", "href": u + "/search", "type": "application/geo+json", "method": "GET"},
                        {"rel": "search", "href": u + "/search", "type": "application/geo+json", "method": "POST"},
                        {"rel": "data", "href": u + "/collections", "type": "application/json"},
                        {"rel": "conformance", "href": u + "/conformance", "type": "application/json"},
                    ],
                }

            def _collection(self, cid):
                u = server.url
                return {
                    "type": "Collection", "id": cid, "stac_version": "1.0.0", "description": cid,
                    "license": "proprietary",
                    "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                               "temporal": {"interval": [[None, None]]}},
                    "links": [{"rel": "self", "href": f"{u}/collections/{cid}"},
                              {"rel": "root", "href": u + "/"}],
                }

            def _file(self, head: bool):
                if server._take_failure("data"):
                    return self._fail()
                rel = urllib.parse.unquote(self.path.split("?")[0][len("/data/"):])
                path = server.root / rel
                if not path.is_file():
                    return self._json({"error": "not found"}, 404)
                data = path.read_bytes()
                rng = self.headers.get("Range")
                status, start, end = 200, 0, len(data) - 1
                if rng:
                    m = re.match(r"bytes=(\d*)-(\d*)", rng)
                    if m:
                        a, b = m.groups()
                        start = int(a) if a else max(0, len(data) - int(b))
                        end = min(int(b), len(data) - 1) if (a and b) else len(data) - 1
                        status = 206
                body = data[start : end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "image/tiff")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                if self.path.startswith("/data/"):
                    return self._file(head=True)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                path, _, query = self.path.partition("?")
                if path.startswith("/data/"):
                    return self._file(head=False)
                if path in ("/", ""):
                    return self._json(self._landing())
                if path == "/conformance":
                    return self._json({"conformsTo": self._landing()["conformsTo"]})
                if path == "/collections":
                    return self._json({"collections": [self._collection(c) for c in server.collections],
                                       "links": []})
                m = re.fullmatch(r"/collections/([^/]+)", path)
                if m:
                    if m.group(1) not in server.collections:
                        return self._json({"code": "NotFound", "description": "no such collection"}, 404)
                    return self._json(self._collection(m.group(1)))
                if path == "/search":
                    if server._take_failure("search"):
                        return self._fail()
                    params = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
                    return self._json(server.search(params))
                return self._json({"error": "not found"}, 404)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(n) or b"{}")
                if self.path.split("?")[0] == "/search":
                    if server._take_failure("search"):
                        return self._fail()
                    return self._json(server.search(payload))
                return self._json({"error": "not found"}, 404)

        return Handler


# ---------------------------------------------------------------------------- the scenes
def write_cog(path: Path, data: np.ndarray, transform, crs: str, nodata) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", height=data.shape[1], width=data.shape[2],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata, blocksize=64, compress="deflate") as dst:
        dst.write(data)


def _item(server: StacServer, iid: str, collection: str, dt: str, assets: dict, props=None) -> dict:
    bbox = list(dl_cfg.make_grid(BBOX)[0].lonlat_bounds())
    pad = 0.004
    bbox = [bbox[0] - pad, bbox[1] - pad, bbox[2] + pad, bbox[3] + pad]
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": collection,
        "bbox": bbox,
        "geometry": {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]],
                                                         [bbox[2], bbox[3]], [bbox[0], bbox[3]],
                                                         [bbox[0], bbox[1]]]]},
        "properties": {"datetime": dt, **(props or {})},
        "assets": {k: {"href": f"{server.url}/data/{v}", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                       "roles": ["data"]} for k, v in assets.items()},
        "links": [],
    }


def _scene_geometry(grid):
    """Scene rasters cover the grid plus MARGIN m: their 10/20 m shapes and transforms, the
    grid's offset (r0, c0) in 10 m scene pixels and the crop of the grid out of a 10 m scene."""
    x0, y0 = grid.left - MARGIN, grid.top + MARGIN
    n10 = int(grid.height + 2 * MARGIN / 10), int(grid.width + 2 * MARGIN / 10)
    n20 = n10[0] // 2, n10[1] // 2
    t10, t20 = from_origin(x0, y0, 10, 10), from_origin(x0, y0, 20, 20)
    r0, c0 = int(MARGIN / 10), int(MARGIN / 10)
    crop = (slice(r0, r0 + grid.height), slice(c0, c0 + grid.width))
    return n10, n20, t10, t20, r0, c0, crop


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stac")
    server = StacServer(root).start()
    grid, _ = dl_cfg.make_grid(BBOX)
    crs = grid.crs
    n10, n20, t10, t20, r0, c0, crop = _scene_geometry(grid)
    rng = np.random.default_rng(0)

    s2_summer, s2_valid, s2_scl10 = [], [], []
    dates = ["2020-06-05T10:20:00Z", "2020-06-15T10:20:00Z", "2020-06-25T10:20:00Z",
             "2020-07-05T10:20:00Z", "2020-09-10T10:20:00Z"]
    stamps = [d.replace("-", "").replace(":", "")[:15] for d in dates]
    for k, dt in enumerate(dates):
        bands = rng.integers(300, 4000, size=(4, *n10)).astype(np.uint16)
        holes = rng.random(n10) < 0.03
        bands[:, holes] = 0
        scl = rng.choice(np.array([4, 5, 6, 3, 8, 9, 10], np.uint8), size=n20,
                         p=[0.4, 0.2, 0.1, 0.08, 0.08, 0.08, 0.06])
        assets = {}
        for b, name in enumerate(dl_cfg.S2_BANDS):
            write_cog(root / f"s2_{k}_{name}.tif", bands[b : b + 1], t10, crs, 0)
            assets[name] = f"s2_{k}_{name}.tif"
        write_cog(root / f"s2_{k}_SCL.tif", scl[None], t20, crs, 0)
        assets["SCL"] = f"s2_{k}_SCL.tif"
        server.items.append(_item(server, f"S2_{k}", "sentinel-2-l2a", dt, assets, {
            "eo:cloud_cover": 30.0 + k,
            "s2:product_uri": f"S2B_MSIL2A_{stamps[k]}_N0214_R065_T32TNR_20200901T000000.SAFE"}))
        if k < 4:
            scl10 = np.repeat(np.repeat(scl, 2, 0), 2, 1)[crop]
            b = bands[(slice(None), *crop)].astype(np.float64)
            ok = (b > 0) & ~np.isin(scl10, SCL_MASK)[None]
            s2_summer.append(np.where(ok, b, np.nan))
            s2_valid.append(bands[(slice(None), *crop)].astype(np.float64))
            s2_scl10.append(scl10)

    # L1C: band values constant on the 60 m blocks of the grid's lattice (block b of scene
    # pixel i is (i - r0) // 6, negative left of / above the grid)
    crng = np.random.default_rng(1)
    rb = (np.arange(n10[0]) - r0) // S2C_FACTOR
    cb = (np.arange(n10[1]) - c0) // S2C_FACTOR
    nb = (rb.max() - rb.min() + 1, cb.max() - cb.min() + 1)
    l1c_blocks = []

    def write_l1c(name: str, toa: np.ndarray) -> dict:
        dn = np.round(toa * 1e4).astype(np.uint16)
        l1c_blocks.append(dn)
        full = dn[(rb - rb.min())[:, None], (cb - cb.min())[None, :]]
        assets = {}
        for i, band in enumerate(dl_cfg.S2CLOUDLESS_BANDS):
            write_cog(root / f"{name}_{band}.tif", np.ascontiguousarray(full[None, :, :, i]), t10, crs, 0)
            assets[band] = f"{name}_{band}.tif"
        return assets

    for k in range(4):
        toa = CLEAR_TOA * (1 + 0.03 * crng.standard_normal((*nb, 10)))
        br0, br1, bc0, bc1 = CLOUD_BLOCKS[k]
        toa[br0 - rb.min() : br1 - rb.min(), bc0 - cb.min() : bc1 - cb.min()] = (
            CLOUD_TOA * (1 + 0.03 * crng.standard_normal((br1 - br0, bc1 - bc0, 10))))
        assets = write_l1c(f"l1c_{k}", toa)
        if k < 2:  # Planetary-Computer-like: the product id says tile and sensing time
            iid = f"S2B_MSIL1C_{stamps[k]}_R065_T32TNR_20200605T120000"
            props = {"s2:product_uri": f"S2B_MSIL1C_{stamps[k]}_N0209_R065_T32TNR_20200605T120000.SAFE"}
            when = dates[k]
        else:  # Earth-Search-like: granule time a few minutes after the datatake start
            iid = f"S2B_32TNR_{stamps[k][:8]}_0_L1C"
            props = {"grid:code": "MGRS-32TNR", "platform": "sentinel-2b", "sat:relative_orbit": 65,
                     "s2:processing_baseline": "02.09"}
            when = dates[k].replace("10:20:00", "10:24:13")
        server.items.append(_item(server, iid, "sentinel-2-l1c", when, assets, props))
    cloudy = np.broadcast_to(CLOUD_TOA, (*nb, 10))
    decoys = [("S2B_32TNR_20200606_0_L1C", "2020-06-06T10:24:13Z", "sentinel-2b", 65),
              ("S2A_32TNR_20200625_0_L1C", dates[2], "sentinel-2a", 22)]
    for j, (iid, when, platform, orbit) in enumerate(decoys):
        assets = write_l1c(f"l1c_decoy{j}", cloudy)
        server.items.append(_item(server, iid, "sentinel-2-l1c", when, assets, {
            "grid:code": "MGRS-32TNR", "platform": platform, "sat:relative_orbit": orbit}))

    s1_linear, orbits = [], []
    s1_specs = [("2020-06-03T05:40:00Z", "ascending", 10), ("2020-06-15T17:20:00Z", "descending", 10),
                ("2020-07-09T05:40:00Z", "ascending", 20), ("2020-06-27T17:20:00Z", "descending", 10),
                ("2020-08-09T17:20:00Z", "descending", 20)]
    for k, (dt, orbit, res) in enumerate(s1_specs):
        shape = n10 if res == 10 else n20
        lin = rng.uniform(0.005, 0.5, size=(2, *shape)).astype(np.float32)
        lin[:, rng.random(shape) < 0.05] = np.nan
        tr = t10 if res == 10 else t20
        assets = {}
        for b, name in enumerate(("vv", "vh")):
            write_cog(root / f"s1_{k}_{name}.tif", lin[b : b + 1], tr, crs, float("nan"))
            assets[name] = f"s1_{k}_{name}.tif"
        server.items.append(_item(server, f"S1_{k}", "sentinel-1-rtc", dt, assets,
                                  {"sat:orbit_state": orbit}))
        if res == 20:
            lin = np.repeat(np.repeat(lin, 2, 1), 2, 2)
        s1_linear.append(lin[(slice(None), *crop)].astype(np.float64))
        orbits.append(orbit)
    yield {"server": server, "grid": grid, "s2": np.stack(s2_summer), "s1": np.stack(s1_linear),
           "orbits": orbits, "s2_bands": np.stack(s2_valid), "s2_scl10": np.stack(s2_scl10),
           "l1c_blocks": np.stack(l1c_blocks[:4]), "block_origin": (int(rb.min()), int(cb.min()))}
    server.stop()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def cfg_for(world, out: Path, **kw) -> dl_cfg.DownloadConfig:
    base = dict(out=str(out), bbox=BBOX, stac_url=world["server"].url, seasons=("summer",),
                chunk_size=40, workers=1, retries=3, retry_delay=0.01, progress=False, sign="none")
    base.update(kw)
    return dl_cfg.DownloadConfig(**base)


def expected_s2(stack: np.ndarray) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(stack, axis=0)
    return np.where(np.isfinite(med), np.rint(np.nan_to_num(med)), 0).astype(np.uint16)


def expected_s1(stack: np.ndarray, statistic: str = "median_db") -> np.ndarray:
    """The S1 composite of a (T, 2, H, W) stack of linear power, written independently of
    :func:`popcorn.prep.download.s1_composite` with numpy's nan-reductions."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if statistic == "mean_linear":
            return (10 * np.log10(np.nanmean(stack, axis=0))).astype(np.float32)
        db = 10 * np.log10(stack)
        if statistic == "mean_db":
            return np.nanmean(db, axis=0).astype(np.float32)
        assert statistic == "median_db"
        return np.nanmedian(db, axis=0).astype(np.float32)


def orbit_stack(world, orbit: str) -> np.ndarray:
    """The fixture's S1 observations (linear power) of one pass direction, or all for "both"."""
    keep = [i for i, o in enumerate(world["orbits"]) if orbit in ("both", o)]
    return world["s1"][keep]


# ---------------------------------------------------------------------------- tests
def test_seasons_grid_and_budget():
    assert dl_cfg.season_dates("winter", 2020) == (dl_cfg.date(2020, 12, 1), dl_cfg.date(2021, 2, 28))
    assert dl_cfg.season_dates("winter", 2023)[1] == dl_cfg.date(2024, 2, 29)
    assert dl_cfg.season_datetime("spring") == "2020-03-01T00:00:00Z/2020-05-31T23:59:59Z"
    grid, note = dl_cfg.make_grid(BBOX)
    assert grid.crs == "EPSG:32632" and note is None
    assert grid.left % 100 == 0 and grid.top % 100 == 0 and grid.res == 10
    # crossing the 6 E zone border: the zone of the centre, and a note saying so
    grid, note = dl_cfg.make_grid((5.5, 45.0, 6.3, 45.2))
    assert grid.crs == "EPSG:32631" and "spans UTM zones 31..32" in note and "EPSG:32631" in note
    # memory budget -> chunk side (multiple of 100 px), monotone in the budget
    small = dl_cfg.chunk_size_for_budget(0.5e9, 40, 5)
    big = dl_cfg.chunk_size_for_budget(8e9, 40, 5)
    assert small % 100 == 0 and big % 100 == 0 and 100 <= small < big
    assert 40 * 5 * 4 * 3 * big**2 <= 8e9
    assert len(dl_cfg.chunk_windows(95, 130, 40)) == 3 * 4


def test_composites_pixel_by_pixel(world, tmp_path):
    out = tmp_path / "imagery"
    written = dl.run(cfg_for(world, out))
    assert sorted(p.name for p in written) == ["S1_summer.tif", "S2_summer.tif"]
    assert not (out / dl_cfg.CHUNK_DIR).exists()  # chunks removed after assembly
    grid = world["grid"]
    with rasterio.open(out / "S2_summer.tif") as src:
        assert src.count == 4 and src.dtypes[0] == "uint16" and src.nodata == 0
        assert [src.descriptions[i] for i in range(4)] == ["B02", "B03", "B04", "B08"]
        assert src.crs.to_epsg() == 32632 and src.transform == grid.transform
        assert src.shape == (grid.height, grid.width)
        assert src.tags()["season"] == "summer" and src.tags()["scenes"] == "4"
        s2 = src.read()
    exp = expected_s2(world["s2"])
    np.testing.assert_array_equal(s2, exp)
    assert (exp == 0).any() or True  # masked-everywhere pixels may or may not occur
    with rasterio.open(out / "S1_summer.tif") as src:
        assert src.count == 2 and src.dtypes[0] == "float32"
        assert [src.descriptions[i] for i in range(2)] == ["VV", "VH"]
        s1 = src.read()
        assert src.tags()["composite"] == "median of dB" and src.tags()["orbit"] == "descending"
        assert src.tags()["scenes"] == "3"  # the three descending passes of the five
    # the defaults are the reference's: median of the dB values of the descending passes
    np.testing.assert_allclose(s1, expected_s1(orbit_stack(world, "descending"), "median_db"),
                               rtol=0, atol=1e-4, equal_nan=True)
    # the S1/S2 datasets of popcorn find and read the files
    from popcorn.datasets.sentinel import Sentinel1Composite, Sentinel2Composite

    assert "summer" in Sentinel2Composite(str(out)).seasons
    assert "summer" in Sentinel1Composite(str(out)).seasons


def _assert_same_files(files: list[Path], reference: list[Path]) -> None:
    """The same composites (names and pixels, NaN where NaN), bit for bit."""
    assert [p.name for p in files] == [p.name for p in reference]
    for a, b in zip(files, reference, strict=True):
        with rasterio.open(a) as x, rasterio.open(b) as y:
            assert np.array_equal(x.read(), y.read(), equal_nan=True), a.name


def test_composites_on_a_dask_cluster_equal_the_local_ones(world, tmp_path):
    """--dask-scheduler: the chunks are read and reduced on a 2-worker dask.distributed
    LocalCluster (worker processes reading the loopback STAC server); the files equal the local
    threads' bit for bit."""
    pytest.importorskip("dask.distributed")
    local = dl.run(cfg_for(world, tmp_path / "local"))
    cluster = dl.run(cfg_for(world, tmp_path / "cluster", dask_scheduler="local:2"))
    _assert_same_files(cluster, local)
    with pytest.raises(PopcornInputError, match="local:N needs N >= 1"):
        dl.run(cfg_for(world, tmp_path / "bad", dask_scheduler="local:0"))
    with pytest.raises(PopcornInputError, match="cannot reach the scheduler"):
        dl.run(cfg_for(world, tmp_path / "bad", dask_scheduler="tcp://127.0.0.1:9", dask_connect_timeout_s=2))


def test_a_dask_worker_lost_mid_way_changes_nothing(world, tmp_path, monkeypatch):
    """A worker of the cluster is killed (SIGKILL) as it starts its first chunk: the scheduler
    gives its work to the other worker (and the restarted one), and the files equal the local ones."""
    distributed = pytest.importorskip("dask.distributed")
    here = str(Path(__file__).parent)  # dask_faults: importable here and in the worker processes
    monkeypatch.syspath_prepend(here)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    from dask_faults import DieOnFirstTask

    local = dl.run(cfg_for(world, tmp_path / "local"))
    marker = tmp_path / "a_worker_died"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(DieOnFirstTask(str(marker)))
        files = dl.run(cfg_for(world, tmp_path / "cluster", dask_scheduler=cluster.scheduler_address))
    assert marker.exists()  # a worker was killed mid-run
    _assert_same_files(files, local)


def test_orbit_filter_and_dry_run(world, tmp_path, capsys):
    out = tmp_path / "asc"
    dl.run(cfg_for(world, out, sensors=("s1",), s1_orbit="ascending"))
    with rasterio.open(out / "S1_summer.tif") as src:
        s1 = src.read()
    np.testing.assert_allclose(s1, expected_s1(orbit_stack(world, "ascending")), atol=1e-4, equal_nan=True)
    # dry run: scenes, output size and download estimate, nothing written
    dry = tmp_path / "dry"
    assert dl.run(cfg_for(world, dry, seasons=("summer", "autumn"), sensors=("s2",), dry_run=True)) == []
    text = capsys.readouterr().out
    assert "S2_summer.tif" in text and "4 scene(s)" in text and "S2_autumn.tif" in text
    assert "estimated download" in text and "uncompressed" in text
    assert not dry.exists()


def test_s1_statistics_by_hand():
    """Each statistic on one pixel computed by hand: linear power 0.1, 1.0, 0.001 (dB -10, 0,
    -30) and, in the second band, 0.1, no data, 1.0 (an even count: median = mean of the two)."""
    stack = np.array([[0.1, 0.1], [1.0, np.nan], [0.001, 1.0]], np.float32)[:, :, None, None]
    med = dl_comp.s1_composite(stack, "median_db")[:, 0, 0]
    mean_db = dl_comp.s1_composite(stack, "mean_db")[:, 0, 0]
    mean_lin = dl_comp.s1_composite(stack, "mean_linear")[:, 0, 0]
    np.testing.assert_allclose(med, [-10.0, -5.0], atol=1e-5)
    np.testing.assert_allclose(mean_db, [-40.0 / 3.0, -5.0], atol=1e-5)
    # 10 log10((0.1 + 1 + 0.001) / 3) = -4.3533; 10 log10(1.1 / 2) = -2.5964
    np.testing.assert_allclose(mean_lin, [-4.35333, -2.59637], atol=1e-4)
    assert dl_cfg.DownloadConfig(out="x").s1_statistic == "median_db"  # the reference's default
    # dB input (an already-logarithmic collection): the same results from the same observations
    db = np.where(np.isfinite(stack), 10 * np.log10(stack), np.nan).astype(np.float32)
    for stat, exp in (("median_db", med), ("mean_db", mean_db), ("mean_linear", mean_lin)):
        np.testing.assert_allclose(dl_comp.s1_composite(db, stat, linear_input=False)[:, 0, 0], exp, atol=1e-4)
    # no observation, zero or negative power: no data
    none = np.array([[np.nan, 0.0], [np.nan, -1.0]], np.float32)[:, :, None, None]
    for stat in dl_cfg.S1_STATISTICS:
        assert np.isnan(dl_comp.s1_composite(none, stat)).all()
        assert np.isnan(dl_comp.s1_composite(stack[:0], stat)).all()
    with pytest.raises(PopcornInputError, match="median_db, mean_db, mean_linear"):
        dl_comp.s1_composite(stack, "max")


@pytest.mark.parametrize("orbit,statistic", [("both", "mean_linear"), ("both", "mean_db"),
                                             ("descending", "mean_linear"), ("ascending", "median_db")])
def test_s1_options_pixel_by_pixel(world, tmp_path, orbit, statistic):
    """Every --s1-orbit / --s1-statistic reaches the written file: the composite equals the
    statistic of exactly that orbit's observations (and differs from the default's)."""
    out = tmp_path / "s1"
    dl.run(cfg_for(world, out, sensors=("s1",), s1_orbit=orbit, s1_statistic=statistic))
    with rasterio.open(out / "S1_summer.tif") as src:
        s1 = src.read()
        assert src.tags()["orbit"] == orbit
        assert src.tags()["scenes"] == str(len(orbit_stack(world, orbit)))
    exp = expected_s1(orbit_stack(world, orbit), statistic)
    np.testing.assert_allclose(s1, exp, rtol=0, atol=1e-4, equal_nan=True)
    default = expected_s1(orbit_stack(world, "descending"), "median_db")
    both = np.isfinite(exp) & np.isfinite(default)
    assert np.abs(exp[both] - default[both]).mean() > 0.5  # the option changes the pixels


def test_s1_orbit_needs_orbit_state():
    """Items without sat:orbit_state cannot be told apart: dropped with a note saying what to do
    unless --s1-orbit both."""
    class Item:
        def __init__(self, props):
            self.assets = {"vv": 1, "vh": 1}
            self.properties = props

    items = [Item({"sat:orbit_state": "descending"}), Item({"sat:orbit_state": "ascending"}), Item({})]
    keep, notes = dl_stac.filter_items(items, "s1", dl_cfg.DownloadConfig(out="x"))
    assert keep == items[:1]
    assert any("not in orbit descending" in n for n in notes)
    assert any("1 item(s) without sat:orbit_state" in n and "--s1-orbit both" in n for n in notes)
    keep, notes = dl_stac.filter_items(items, "s1", dl_cfg.DownloadConfig(out="x", s1_orbit="both"))
    assert keep == items and notes == []
    with pytest.raises(PopcornInputError, match="--s1-statistic must be one of"):
        dl_cfg.DownloadConfig(out="x", bbox=BBOX, s1_statistic="max").check()


def test_resume_and_retries(world, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    calls = []
    real = dl_comp.composite_chunk

    def flaky(items, sensor, grid, rows, cols, cfg, signer=None):
        calls.append((rows.start, cols.start))
        if len(calls) == 3:
            raise PopcornInputError("simulated crash")  # not transient: the run stops
        return real(items, sensor, grid, rows, cols, cfg, signer)

    monkeypatch.setattr(dl, "composite_chunk", flaky)
    cfg = cfg_for(world, out, sensors=("s2",))
    with pytest.raises(PopcornInputError, match="simulated"):
        dl.run(cfg)
    assert not (out / "S2_summer.tif").exists()  # nothing half-written
    kept = list((out / dl_cfg.CHUNK_DIR).rglob("*.tif"))
    assert len(kept) == 2 and not list((out / dl_cfg.CHUNK_DIR).rglob("*.tmp-*"))
    n_chunks = len(dl_cfg.chunk_windows(world["grid"].height, world["grid"].width, 40))
    calls.clear()
    # transient failures of the search endpoint and of data reads are retried
    world["server"].fail.update(search=1, data=2)
    dl.run(cfg)
    assert len(calls) == n_chunks - 2  # finished chunks were reused
    assert world["server"].fail == {"search": 0, "data": 0}
    with rasterio.open(out / "S2_summer.tif") as src:
        np.testing.assert_array_equal(src.read(), expected_s2(world["s2"]))
    # a finished file is kept on the next run
    calls.clear()
    dl.run(cfg)
    assert calls == []


def test_bad_inputs(world, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(PopcornInputError, match="collection 'sentinel-2-nope' not found"):
        dl.run(cfg_for(world, out, s2_collection="sentinel-2-nope"))
    with pytest.raises(PopcornInputError, match="no usable 'sentinel-2-l2a' scene.*winter 2020"):
        dl.run(cfg_for(world, out, seasons=("winter",)))
    with pytest.raises(PopcornInputError, match="no usable.*max-cloud-cover"):
        dl.run(cfg_for(world, out, max_cloud_cover=5))
    with pytest.raises(PopcornInputError, match="exactly one of --bbox"):
        dl.run(dl_cfg.DownloadConfig(out=str(out)))
    with pytest.raises(PopcornInputError, match="bounding box"):
        dl.run(cfg_for(world, out, bbox=(10, 45, 9, 46)))
    assert not out.exists() or not any(out.rglob("*.tif"))


def test_s2cloudless_missing_is_explained(world, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_s2cloudless(name, *args, **kwargs):
        if name.startswith("s2cloudless"):
            raise ImportError("No module named 's2cloudless'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_s2cloudless)
    with pytest.raises(PopcornInputError, match="needs the 's2cloudless' package"):
        dl.run(cfg_for(world, tmp_path / "c", sensors=("s2",), cloud_mask="s2cloudless"))


def expected_s2cloudless_mask(world, blocks: np.ndarray | None = None) -> np.ndarray:
    """(T, H, W) cloud masks of the summer scenes (or of the L1C ``blocks``: T, rows, cols, 10
    reflectance x 1e4 without offset) from s2cloudless's public API on the 60 m block values
    written to the L1C files (not through the download code)."""
    from s2cloudless import S2PixelCloudDetector

    blocks = world["l1c_blocks"] if blocks is None else blocks
    detector = S2PixelCloudDetector(threshold=0.6, average_over=1, dilation_size=1, all_bands=False)
    blocks = detector.get_cloud_masks(blocks.astype(np.float32) / 1e4).astype(bool)
    grid = world["grid"]
    rb0, cb0 = world["block_origin"]
    rows = np.arange(grid.height) // S2C_FACTOR - rb0
    cols = np.arange(grid.width) // S2C_FACTOR - cb0
    return blocks[:, rows[:, None], cols[None, :]]


def test_s2cloudless_masks_pixel_by_pixel(world, tmp_path, capsys):
    out = tmp_path / "s2c"
    cfg = cfg_for(world, out, sensors=("s2",), cloud_mask="s2cloudless")
    assert dl.run(dataclasses.replace(cfg, dry_run=True)) == []
    assert "s2cloudless on 4 paired L1C scene(s)" in capsys.readouterr().out
    dl.run(cfg)
    with rasterio.open(out / "S2_summer.tif") as src:
        s2 = src.read()
        assert src.tags()["cloud_mask"].startswith("s2cloudless p > 0.6 at 60 m")
    cloud = expected_s2cloudless_mask(world)
    # the detector finds every painted cloud (3x3+ blocks of 60 m) and leaves most land clear
    for k, (r0, r1, c0, c1) in enumerate(CLOUD_BLOCKS):
        rows = slice(r0 * S2C_FACTOR, min(r1 * S2C_FACTOR, world["grid"].height))
        cols = slice(c0 * S2C_FACTOR, min(c1 * S2C_FACTOR, world["grid"].width))
        assert cloud[k][rows, cols].all(), k
        assert cloud[k].mean() < 0.5, k
    bands = world["s2_bands"]
    ok = (bands > 0) & ~np.isin(world["s2_scl10"], (0, 1, 3))[:, None] & ~cloud[:, None]
    expected = expected_s2(np.where(ok, bands, np.nan))
    np.testing.assert_array_equal(s2, expected)
    # it is a different composite from the SCL-masked one, and cloud pixels were dropped
    scl_only = expected_s2(np.where((bands > 0) & ~np.isin(world["s2_scl10"], (0, 1, 3))[:, None], bands, np.nan))
    assert (s2 != scl_only).any()


def test_s2cloudless_scene_without_l1c_is_named(world, tmp_path):
    with pytest.raises(PopcornInputError, match=r"1 of 1 'sentinel-2-l2a' scene\(s\) of autumn 2020 have no "
                       r"matching 'sentinel-2-l1c' scene .*S2_4 \(no L1C item of tile 32TNR at "
                       r"2020-09-10T10:20:00\).*--l1c-collection.*--cloud-mask scl"):
        dl.run(cfg_for(world, tmp_path / "x", sensors=("s2",), seasons=("autumn",), cloud_mask="s2cloudless"))
    with pytest.raises(PopcornInputError, match="collection 'sentinel-2-l1c-nope' not found"):
        dl.run(cfg_for(world, tmp_path / "x", sensors=("s2",), cloud_mask="s2cloudless",
                       l1c_collection="sentinel-2-l1c-nope"))
    with pytest.raises(PopcornInputError, match="--s2cloudless-res must be a positive multiple"):
        dl.run(cfg_for(world, tmp_path / "x", sensors=("s2",), cloud_mask="s2cloudless", s2cloudless_res=25))
    assert not (tmp_path / "x").exists()


def test_pair_l1c_rules():
    import datetime as pydt

    import pystac

    def item(iid, when, props=None, assets=dl_cfg.S2CLOUDLESS_BANDS):
        it = pystac.Item(iid, None, None, pydt.datetime.fromisoformat(when), props or {})
        for a in assets:
            it.add_asset(a, pystac.Asset(f"http://x/{iid}/{a}"))
        return it

    l2a = [item("S2A_MSIL2A_20210301T100021_N0300_R122_T33UUP_20210301T130000", "2021-03-01T10:00:21+00:00"),
           item("l2a-b", "2021-03-04T10:10:00+00:00", {"s2:mgrs_tile": "33UUP", "platform": "sentinel-2b"}),
           item("l2a-c", "2021-03-06T10:10:00+00:00", {"s2:mgrs_tile": "33UUP"})]
    l1c = [item("S2A_MSIL1C_20210301T100021_N0209_R122_T33UUP_20210301T110000", "2021-03-01T10:03:00+00:00"),
           item("S2A_MSIL1C_20210301T100021_N0209_R122_T33UUQ_20210301T110000", "2021-03-01T10:03:00+00:00"),
           item("b-far", "2021-03-04T10:50:00+00:00", {"grid:code": "MGRS-33UUP"}),
           item("b-near", "2021-03-04T10:14:00+00:00", {"mgrs:utm_zone": 33, "mgrs:latitude_band": "U",
                                                       "mgrs:grid_square": "UP", "platform": "sentinel-2b"}),
           item("c-no-b10", "2021-03-06T10:12:00+00:00", {"s2:mgrs_tile": "33UUP"},
                assets=[b for b in dl_cfg.S2CLOUDLESS_BANDS if b != "B10"])]
    pairs, why = dl_stac.pair_l1c(l2a, l1c, dl_cfg.S2CLOUDLESS_BANDS)
    assert [p.id if p else None for p in pairs] == [l1c[0].id, "b-near", None]
    assert why == {"l2a-c": "its L1C item c-no-b10 lacks the asset(s) ['B10']"}
    assert dl_stac.s2_dn_offset(l1c[0]) == (0.0, "product id")
    new_l1c = item("S2B_MSIL1C_20220601T101559_N0400_R065_T32TMT_x", "2022-06-01T10:00:00+00:00")
    assert dl_stac.s2_dn_offset(new_l1c) == (-1000.0, "product id")


def test_planetary_computer_signing_is_optional(monkeypatch):
    import builtins

    cfg = dl_cfg.DownloadConfig(out="x", bbox=BBOX)
    real_import = builtins.__import__

    def no_pc(name, *args, **kwargs):
        if name == "planetary_computer":
            raise ImportError("nope")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pc)
    with pytest.raises(PopcornInputError, match="pip install planetary-computer"):
        dl_stac._signer(cfg)
    assert dl_stac._signer(dl_cfg.DownloadConfig(out="x", bbox=BBOX, stac_url="http://127.0.0.1:1")) is None


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        dl_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--bbox" in text and "--dry-run" in text and "--memory-gb" in text
    assert "--s1-statistic" in text and "--s1-orbit" in text
    ns = dl_cli.build_parser().parse_args(["--bbox", "0", "0", "1", "1", "--out", "x"])
    cfg = dl_cli.config_from_args(ns)
    assert (cfg.s1_orbit, cfg.s1_statistic) == ("descending", "median_db")
    cfg = dl_cli.config_from_args(dl_cli.build_parser().parse_args(
        ["--bbox", "0", "0", "1", "1", "--out", "x", "--s1-statistic", "mean_linear", "--s1-orbit", "both"]))
    assert (cfg.s1_orbit, cfg.s1_statistic) == ("both", "mean_linear")


# ---------------------------------------------------------------------------- DN offset (PB 04.00)
# Winter 2021 (2021-12-01..2022-02-28) spans the processing baseline change of 2022-01-25. Every
# scene observes a true reflectance x 1e4 ``refl``; its DNs are refl + 1000 where the product
# carries the offset. (id, datetime, properties, DN offset of the L2A data, L1C item)
_W_L1C = {
    "a": ("S2A_MSIL1C_20211206T102321_N0301_R065_T32TNR_20211206T110000", "2021-12-06T10:23:21Z", {}, 0),
    "b": ("S2B_MSIL1C_20211216T102329_N0301_R065_T32TNR_20211216T110000", "2021-12-16T10:23:29Z", {}, 0),
    "c": ("S2A_32TNR_20220120_0_L1C", "2022-01-20T10:27:40Z", {"grid:code": "MGRS-32TNR"}, 0),  # by date
    "d": ("S2B_MSIL1C_20220204T102329_N0400_R065_T32TNR_20220204T110000", "2022-02-04T10:23:29Z", {}, -1000),
    "e": ("S2A_32TNR_20220214_0_L1C", "2022-02-14T10:27:40Z",
          {"grid:code": "MGRS-32TNR", "s2:processing_baseline": "04.00"}, -1000),
    "f": ("S2B_32TNR_20220224_0_L1C", "2022-02-24T10:27:40Z",
          {"grid:code": "MGRS-32TNR", "s2:processing_baseline": "04.00"}, -1000),
}
_W_SCENES = [
    ("S2A_MSIL2A_20211206T102321_N0301_R065_T32TNR_20211206T120000", "2021-12-06T10:23:21Z",
     {"product_uri": True}, 0, "a"),                                               # N0301 in the id
    ("S2B_MSIL2A_20211216T102329_N0301_R065_T32TNR_20211216T120000", "2021-12-16T10:23:29Z",
     {"s2:processing_baseline": "03.01"}, 0, "b"),
    ("S2B_MSIL2A_20211216T102329_N0500_R065_T32TNR_20230301T000000", "2021-12-16T10:23:29Z",
     {"s2:processing_baseline": "05.00"}, -1000, "b"),        # the same acquisition reprocessed
    ("S2A_32TNR_20220120_0_L2A", "2022-01-20T10:23:21Z", {}, 0, "c"),         # no baseline: date
    ("S2B_MSIL2A_20220204T102329_N0400_R065_T32TNR_20220204T120000", "2022-02-04T10:23:29Z",
     {"s2:processing_baseline": "04.00"}, -1000, "d"),
    ("S2A_32TNR_20220214_0_L2A", "2022-02-14T10:23:21Z", {}, -1000, "e"),      # no baseline: date
    ("S2B_32TNR_20220224_0_L2A", "2022-02-24T10:23:29Z",                 # offset already removed
     {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True}, 0, "f"),
]
_W_CLOUDS = {"a": (1, 4, 1, 4), "d": (6, 10, 4, 8)}  # 60 m blocks r0 r1 c0 c1


@pytest.fixture(scope="module")
def winter(world):
    """The scenes of :data:`_W_SCENES` and their L1C scenes, on the server of ``world``."""
    server, grid = world["server"], world["grid"]
    root = server.root
    n10, n20, t10, t20, r0, c0, crop = _scene_geometry(grid)
    rng = np.random.default_rng(7)
    rb = (np.arange(n10[0]) - r0) // S2C_FACTOR
    cb = (np.arange(n10[1]) - c0) // S2C_FACTOR
    nb = (rb.max() - rb.min() + 1, cb.max() - cb.min() + 1)

    l1c_blocks = {}
    for key, (iid, when, props, offset) in _W_L1C.items():
        toa = CLEAR_TOA * (1 + 0.03 * rng.standard_normal((*nb, 10)))
        if key in _W_CLOUDS:
            br0, br1, bc0, bc1 = _W_CLOUDS[key]
            toa[br0 - rb.min() : br1 - rb.min(), bc0 - cb.min() : bc1 - cb.min()] = CLOUD_TOA
        refl = np.round(toa * 1e4).astype(np.uint16)
        l1c_blocks[key] = refl
        full = (refl.astype(np.int64) - offset).astype(np.uint16)[(rb - rb.min())[:, None], (cb - cb.min())[None, :]]
        assets = {}
        for i, band in enumerate(dl_cfg.S2CLOUDLESS_BANDS):
            write_cog(root / f"w_{key}_{band}.tif", np.ascontiguousarray(full[None, :, :, i]), t10,
                      grid.crs, 0)
            assets[band] = f"w_{key}_{band}.tif"
        props = dict(props)
        if iid.startswith("S2") and "_MSIL1C_" in iid:
            props["s2:product_uri"] = iid + ".SAFE"
        server.items.append(_item(server, iid, "sentinel-2-l1c", when, assets, props))

    dn_list, corrected, scl_list = [], [], []
    for k, (iid, when, props, offset, _) in enumerate(_W_SCENES):
        refl = rng.integers(300, 4000, size=(4, *n10)).astype(np.int64)
        dn = refl - offset
        if offset:  # a few valid DNs below the offset: negative reflectance -> clipped to 1
            dark = rng.random(n10) < 0.03
            dn[:, dark] = rng.integers(1, 1000, size=(4, int(dark.sum())))
        holes = rng.random(n10) < (0.4 if k == 2 else 0.03)  # the reprocessed scene has big gaps
        dn[:, holes] = 0
        dn = dn.astype(np.uint16)
        scl = rng.choice(np.array([4, 5, 6, 3, 8, 9, 10], np.uint8), size=n20,
                         p=[0.5, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05])
        assets = {}
        for b, name in enumerate(dl_cfg.S2_BANDS):
            write_cog(root / f"w{k}_{name}.tif", dn[b : b + 1], t10, grid.crs, 0)
            assets[name] = f"w{k}_{name}.tif"
        write_cog(root / f"w{k}_SCL.tif", scl[None], t20, grid.crs, 0)
        assets["SCL"] = f"w{k}_SCL.tif"
        props = dict(props)
        if props.pop("product_uri", None):
            props["s2:product_uri"] = iid + ".SAFE"
        server.items.append(_item(server, iid, "sentinel-2-l2a", when, assets, props))
        raw = dn[(slice(None), *crop)].astype(np.float64)
        # expected, by hand: DN + offset, clipped to 1 (0 stays no data)
        corrected.append(np.where(raw > 0, np.maximum(raw + offset, 1), np.nan))
        dn_list.append(raw)
        scl_list.append(np.repeat(np.repeat(scl, 2, 0), 2, 1)[crop])
    rows = np.arange(grid.height) // S2C_FACTOR - int(rb.min())
    cols = np.arange(grid.width) // S2C_FACTOR - int(cb.min())
    return {"dn": np.stack(dn_list), "corrected": np.stack(corrected), "scl10": np.stack(scl_list),
            "l1c_blocks": np.stack([l1c_blocks[s[4]] for s in _W_SCENES]), "rows": rows, "cols": cols}


def expected_winter(winter, drop: np.ndarray) -> np.ndarray:
    """Median of the offset-corrected observations not in ``drop`` (scenes, H, W); scenes 1 and 2
    are one acquisition day: the reprocessed scene 2 (baseline 05.00) first, scene 1 fills its
    gaps."""
    obs = np.where(drop[:, None], np.nan, winter["corrected"])
    day = np.where(winter["dn"][2] > 0, obs[2], obs[1])
    return expected_s2(np.stack([obs[0], day, *obs[3:]]))


def test_s2_dn_offset_rules():
    import datetime as pydt

    import pystac

    def item(iid, when, props=None):
        return pystac.Item(iid, None, None, pydt.datetime.fromisoformat(when), props or {})

    new, old = "2022-03-01T10:00:00+00:00", "2021-03-01T10:00:00+00:00"
    off = dl_stac.s2_dn_offset
    assert off(item("x", old, {"s2:processing_baseline": "04.00"})) == (-1000.0, "baseline")
    assert off(item("x", old, {"s2:processing_baseline": "05.09"})) == (-1000.0, "baseline")  # reprocessed
    assert off(item("x", new, {"s2:processing_baseline": "03.01"})) == (0.0, "baseline")
    assert off(item("x", new, {"s2:processing_baseline": 4.0})) == (-1000.0, "baseline")
    assert off(item("x", old, {"sentinel:processing_baseline": "N0400"})) == (-1000.0, "baseline")
    assert off(item("x", new, {"s2:product_uri": "S2A_MSIL2A_20220301T100021_N0301_R122_T33UUP_x.SAFE"})) == (
        0.0, "product id")
    assert off(item("S2A_MSIL2A_20210301T100021_N0500_R122_T33UUP_x", old)) == (-1000.0, "product id")
    assert off(item("x", new, {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": True})) == (
        0.0, "already removed")
    assert off(item("x", new, {"s2:processing_baseline": "04.00", "earthsearch:boa_offset_applied": False})) == (
        -1000.0, "baseline")
    assert off(item("S2A_33UUP_20220124_0_L2A", "2022-01-24T23:59:59+00:00")) == (0.0, "date")
    assert off(item("S2A_33UUP_20220125_0_L2A", "2022-01-25T00:00:00+00:00")) == (-1000.0, "date")
    assert off(item("x", "2022-01-25T01:00:00+02:00", {"s2:processing_baseline": "?"})) == (0.0, "date")
    # s2_median: offset on valid DNs only, clipped to 1; split days fused, first step first
    bands = np.array([[1500, 0, 900, 2000], [400, 700, 0, 1000], [600, 800, 100, 3000]], np.uint16)
    bands = bands.reshape(3, 1, 1, 4).repeat(4, axis=1)
    med = dl_comp.s2_median(bands, None, (), offsets=[-1000, 0, 0], days=[1, 1, 2])[0, 0]
    # day 1: [500, 700 (gap filled by step 1), 1 (clipped), 1000]; day 2: [600, 800, 100, 3000]
    np.testing.assert_array_equal(med, [550, 750, 50, 2000])


def test_s2_offset_across_baseline_change(world, winter, tmp_path, capsys, caplog):
    out = tmp_path / "winter"
    cfg = cfg_for(world, out, sensors=("s2",), seasons=("winter",), year=2021, chunk_size=75, workers=4)
    with caplog.at_level("INFO", logger="popcorn.prep.download"):
        assert dl.run(dataclasses.replace(cfg, dry_run=True)) == []
    text = capsys.readouterr().out
    assert "7 scene(s) of 7 found" in text
    assert "DN offset -1000 removed from 3 of 7 scene(s) (2 without processing baseline: decided by date)" in text
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "2 scene(s) without processing baseline" in warned[0]
    assert "S2A_32TNR_20220120_0_L2A, S2A_32TNR_20220214_0_L2A" in warned[0]
    dl.run(cfg)  # 2 chunks, SCL mask
    with rasterio.open(out / "S2_winter.tif") as src:
        s2 = src.read()
        assert src.tags()["dn_offset"].startswith("-1000 removed from 3 of 7 scenes")
    expected = expected_winter(winter, np.isin(winter["scl10"], SCL_MASK))
    np.testing.assert_array_equal(s2, expected)
    # without the correction the composite would be brighter (here by ~500 on most pixels)
    raw = np.where(winter["dn"] > 0, winter["dn"], np.nan)
    uncorrected = expected_s2(np.where(np.isin(winter["scl10"], SCL_MASK)[:, None], np.nan, raw))
    assert np.median(uncorrected.astype(float) - s2) > 300
    assert (s2[:, expected.any(axis=0)] >= 1).all()


def test_s2cloudless_offset_across_baseline_change(world, winter, tmp_path, caplog):
    out = tmp_path / "winter_s2c"
    cfg = cfg_for(world, out, sensors=("s2",), seasons=("winter",), year=2021, cloud_mask="s2cloudless",
                  chunk_size=200, workers=4)
    with caplog.at_level("WARNING", logger="popcorn.prep.download"):
        dl.run(cfg)
    assert any("sentinel-2-l1c winter 2021: 1 scene(s) without processing baseline" in r.getMessage()
               and "S2A_32TNR_20220120_0_L1C" in r.getMessage() for r in caplog.records)
    with rasterio.open(out / "S2_winter.tif") as src:
        s2 = src.read()
    cloud = expected_s2cloudless_mask(world, winter["l1c_blocks"])
    assert cloud[0].sum() > cloud[1].sum() and cloud[4].sum() > cloud[3].sum()  # the painted clouds
    drop = np.isin(winter["scl10"], (0, 1, 3)) | cloud
    np.testing.assert_array_equal(s2, expected_winter(winter, drop))
