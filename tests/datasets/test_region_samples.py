"""Region samples through TorchGeo: RegionQuery GeoSlices answered by the IntersectionDataset
``(s1 & s2) & regions`` hold the same arrays as direct pixel-window reads (tiny world)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REGIONS
from torchgeo.datasets import IntersectionDataset

from popcorn.datasets import SEASONS, CensusRegions, RegionQuery, RegionSamples, collate_regions, season_slice
from popcorn.datasets.sentinel import index_rows, open_imagery
from popcorn.samplers import RegionSampler

MARGIN = 3


@pytest.fixture(scope="module")
def data(tiny_world: Path):  # noqa: ANN201
    s1, s2, grid = open_imagery(tiny_world, SEASONS)
    regions = CensusRegions(tiny_world / "census_regions.gpkg", tiny_world / "census_counts.csv", grid)
    return s1, s2, regions, RegionSamples(s1, s2, regions)


def padded(regions: CensusRegions) -> dict[int, tuple[int, int, int, int]]:
    return {i: (r - MARGIN, c - MARGIN, h + 2 * MARGIN, w + 2 * MARGIN) for i, (r, c, h, w) in regions.windows.items()}


def test_geoslice_path_equals_direct_window_reads(data) -> None:  # noqa: ANN001
    s1, s2, regions, samples = data
    assert isinstance(samples, IntersectionDataset)
    sampler = RegionSampler(padded(regions), regions.ids, SEASONS, shuffle=False, grid=regions.grid)
    # every region, in every season (autumn holds the kept 12x12 S1 gap, summer the filled 3x3 one)
    queries = [sampler.query(rid, season) for rid in regions.ids for season in SEASONS]
    for q in queries:
        sample = samples[q]
        rid, season, window = q.region_id, q.season, q.window
        for key, ds in (("s1", s1), ("s2", s2)):
            direct = ds.read_window(season, window)
            assert sample[key].dtype == direct.dtype and sample[key].shape == direct.shape
            assert torch.equal(sample[key].isnan(), direct.isnan()), (key, q)
            assert torch.equal(sample[key].nan_to_num(-1e9), direct.nan_to_num(-1e9)), (key, q)  # bit for bit
        assert torch.equal(sample["region_mask"], torch.from_numpy(regions.region_mask(rid, window)))
        assert sample["count"] == regions.counts[rid] and sample["region_id"] == rid
        assert sample["season"] == season and tuple(sample["window"]) == window
    # batches: padded as before, TorchGeo's stack for the rest
    batch = collate_regions([samples[q] for q in queries[:2]])
    assert batch["s2"].shape[0] == 2 and batch["region_id"].dtype == torch.int64
    assert batch["season"] == [queries[0].season, queries[1].season] and len(batch["bounds"]) == 2


def test_sampler_yields_pixel_aligned_geoslices_selecting_the_season(data) -> None:  # noqa: ANN001
    _, s2, regions, _ = data
    grid = regions.grid
    sampler = RegionSampler(padded(regions), regions.ids, SEASONS, shuffle=True, seed=2, grid=grid)
    queries = list(sampler)
    assert sorted(q.region_id for q in queries) == sorted(REGIONS)
    for q in queries:
        x, y, t = q  # a TorchGeo GeoSlice
        r0, r1, c0, c1 = REGIONS[q.region_id]
        left, top = grid.transform.c, grid.transform.f
        assert (x.start, x.stop, x.step) == (left + (c0 - MARGIN) * grid.res, left + (c1 + MARGIN) * grid.res, grid.res)
        assert (y.start, y.stop, y.step) == (top - (r1 + MARGIN) * grid.res, top - (r0 - MARGIN) * grid.res, grid.res)
        assert (t.start, t.stop) == (season_slice(q.season).start, season_slice(q.season).stop)
        assert s2[q]["season"] == q.season  # the t slice selects that season's composite
        assert grid.slices_to_window(x, y) == q.window


def test_region_query_is_a_geoslice_that_keeps_its_id(data) -> None:  # noqa: ANN001
    _, s2, regions, samples = data
    sampler = RegionSampler(padded(regions), regions.ids, SEASONS, shuffle=False, grid=regions.grid)
    q = sampler.query(3, "winter")
    back = pickle.loads(pickle.dumps(q))  # DataLoader workers receive pickled queries
    assert back == q and back.region_id == 3 and back.season == "winter" and back.window == q.window
    assert tuple(back) == tuple(q) and len(q) == 3
    other = RegionQuery(*q, region_id=4, season="winter", window=q.window)
    assert other != q  # same box, another region
    plain = samples[tuple(q)]  # a plain GeoSlice: the id raster, no region fields
    assert "region_id" not in plain
    assert torch.equal(plain["mask"], torch.from_numpy(regions.mask_window(q.window)).long())
    assert torch.equal(plain["s2"].nan_to_num(0), s2.read_window("winter", q.window).nan_to_num(0))


def test_index_rows_match_geopandas(data) -> None:  # noqa: ANN001
    s1, _, regions, _ = data
    grid = regions.grid
    rng = np.random.default_rng(0)
    for _ in range(40):
        r, c = rng.integers(-20, 70, size=2)
        h, w = rng.integers(1, 30, size=2)
        x, y = grid.window_to_slices((int(r), int(c), int(h), int(w)))
        t = season_slice(SEASONS[int(rng.integers(4))])
        for ds in (s1, regions):
            frame = ds.index.assign(position=np.arange(len(ds.index)))
            frame = frame.iloc[frame.index.overlaps(pd.Interval(t.start, t.stop, closed="both"))]
            expected = frame.cx[x.start : x.stop, y.start : y.stop]["position"].tolist()
            assert index_rows(ds, x, y, t).tolist() == expected
            assert index_rows(ds, x, y, t).tolist() == expected  # memoised answer
