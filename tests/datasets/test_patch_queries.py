"""Built-up patches through TorchGeo: the patch samplers' PatchQuery GeoSlices, answered by the
IntersectionDataset ``s1 & s2`` (plus the label), hold the same arrays as direct pixel-window
reads (tiny world), and the samplers draw the same patches as the pixel-window samplers did."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRANSFORM, H, W, make_tiny_world, s1_array, write_raster
from rasterio.transform import from_origin
from torchgeo.datasets import IntersectionDataset

from popcorn.datasets import SEASONS, PatchQuery, PatchSamples, RegionQuery, SentinelPairs, season_slice
from popcorn.datasets.samples import LabelRaster, collate_patches
from popcorn.datasets.sentinel import open_imagery
from popcorn.samplers import FixedPatchSampler, MultiAreaPatchSampler, RandomPatchSampler, TileGridSampler
from popcorn.samplers.windows import patch_query

LABEL_ROWS, LABEL_COLS = (5, 55), (10, 70)  # the label raster covers only part of the grid
NODATA = -9999.0


@pytest.fixture(scope="module")
def label_values() -> np.ndarray:
    """Built-up fractions outside [0, 1] (clipped on read) with nodata pixels (-> 0)."""
    rng = np.random.default_rng(0)
    values = (rng.random((LABEL_ROWS[1] - LABEL_ROWS[0], LABEL_COLS[1] - LABEL_COLS[0])) * 1.6 - 0.3).astype(np.float32)
    values[rng.random(values.shape) < 0.1] = NODATA
    return values


@pytest.fixture(scope="module")
def data(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory, label_values: np.ndarray):  # noqa: ANN201
    s1, s2, grid = open_imagery(tiny_world, SEASONS)
    path = tmp_path_factory.mktemp("labels") / "builtup.tif"
    x0, y0 = TRANSFORM.c + LABEL_COLS[0] * grid.res, TRANSFORM.f - LABEL_ROWS[0] * grid.res
    write_raster(path, label_values[None], nodata=NODATA, transform=from_origin(x0, y0, grid.res, grid.res))
    labels = LabelRaster(path, grid, "built-up labels raster")
    return s1, s2, grid, SentinelPairs(s1, s2), PatchSamples(s1, s2, labels)


def expected_label(window: tuple[int, int, int, int], values: np.ndarray) -> np.ndarray:
    """The label over a pixel window, computed here: 0 outside the raster and on nodata, clipped."""
    canvas = np.zeros((H, W), np.float32)
    canvas[LABEL_ROWS[0] : LABEL_ROWS[1], LABEL_COLS[0] : LABEL_COLS[1]] = np.where(values == NODATA, 0, values)
    row, col, h, w = window
    return np.clip(canvas[row : row + h, col : col + w], 0.0, 1.0)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def sampler_queries(grid) -> list[PatchQuery]:  # noqa: ANN001
    """What the data module's samplers ask: random training patches (train strip, whole target),
    the fixed validation tiling (up to the right and bottom edge) and the whole-target tiling."""
    queries = list(RandomPatchSampler((0, 0, H, 60), 16, 40, SEASONS, seed=1, grid=grid))
    queries += list(RandomPatchSampler((0, 0, H, W), 16, 40, SEASONS, seed=2, grid=grid))
    queries += list(FixedPatchSampler((0, 60, H, 20), 16, SEASONS, grid=grid))
    queries += list(FixedPatchSampler((0, 0, H, W), 16, SEASONS, None, grid))
    queries += list(FixedPatchSampler((0, 0, H, W), 64, SEASONS, grid=grid))  # patch larger than the grid
    return queries


def test_sampled_patches_equal_direct_window_reads(data, label_values) -> None:  # noqa: ANN001
    s1, s2, grid, images, samples = data
    assert isinstance(images, IntersectionDataset) and isinstance(samples, IntersectionDataset)
    queries = sampler_queries(grid)
    assert {q.season for q in queries} == set(SEASONS)
    assert any(q.window[0] + q.window[2] == H for q in queries)  # patches reach the bottom edge
    assert any(q.window[1] + q.window[3] == W for q in queries)  # and the right edge
    for q in queries:
        season, window = q.season, q.window
        unlabelled, labelled = images[q], samples[q]
        assert set(unlabelled) == {"s1", "s2", "season", "bounds"} and "builtup" not in unlabelled
        for sample in (unlabelled, labelled):
            assert same_bits(sample["s1"], s1.read_window(season, window)), q  # NaN gaps included
            assert same_bits(sample["s2"], s2.read_window(season, window)), q
            assert sample["season"] == season and sample["bounds"] == tuple(q)
        assert same_bits(labelled["builtup"], torch.from_numpy(expected_label(window, label_values))[None]), q
    # the gaps of the tiny world are among the patches: filled 3x3 (summer), kept 12x12 (autumn)
    autumn_gap = [q for q in queries if q.season == "autumn" and images[q]["s1"].isnan().any()]
    assert autumn_gap
    batch = collate_patches([samples[q] for q in queries[:3]])
    assert batch["builtup"].shape == (3, 1, 16, 16) and batch["season"] == [q.season for q in queries[:3]]


def test_queries_are_pixel_aligned_geoslices_selecting_the_season(data) -> None:  # noqa: ANN001
    _, s2, grid, _, _ = data
    for q in sampler_queries(grid):
        x, y, t = q
        assert (x, y) == grid.window_to_slices(q.window) and x.step == y.step == grid.res
        assert (t.start, t.stop) == (season_slice(q.season).start, season_slice(q.season).stop)
        assert grid.slices_to_window(x, y) == q.window
        assert s2[q]["season"] == q.season  # the plain dataset reads the query as a GeoSlice


def test_random_draws_are_unchanged() -> None:
    """Recorded from the pixel-window samplers (PatchKey) before the move to GeoSlices."""
    sampler = RandomPatchSampler((2, 3, 50, 60), 16, 6, SEASONS, seed=3)
    assert [(q.season, q.window) for q in sampler] == [
        ("summer", (28, 18, 16, 16)), ("summer", (5, 23, 16, 16)), ("autumn", (19, 19, 16, 16)),
        ("summer", (34, 22, 16, 16)), ("winter", (2, 37, 16, 16)), ("autumn", (22, 39, 16, 16)),
    ]
    sampler.set_epoch(1)
    assert [(q.season, q.window) for q in sampler] == [
        ("winter", (24, 35, 16, 16)), ("spring", (14, 43, 16, 16)), ("spring", (17, 4, 16, 16)),
        ("winter", (24, 28, 16, 16)), ("autumn", (11, 29, 16, 16)), ("winter", (17, 30, 16, 16)),
    ]
    multi = MultiAreaPatchSampler([(0, 0, 60, 80), (0, 0, 30, 40)], [None, None], 16, 5, ("summer", "winter"), 1)
    assert [(i, q.season, q.window) for i, q in multi] == [
        (0, "winter", (2, 8, 16, 16)), (1, "winter", (1, 3, 16, 16)), (0, "winter", (23, 22, 16, 16)),
        (0, "winter", (44, 11, 16, 16)), (0, "winter", (1, 52, 16, 16)),
    ]
    fixed = FixedPatchSampler((0, 60, 60, 20), 16, ("spring", "summer", "autumn"), 5)
    assert [(q.season, q.window) for q in fixed] == [
        ("spring", (0, 60, 16, 16)), ("summer", (16, 60, 16, 16)), ("autumn", (32, 60, 16, 16)),
    ]


@pytest.mark.parametrize(("area", "patch", "seed"), [((0, 0, 60, 80), 16, 0), ((4, 7, 12, 50), 16, 9)])
def test_random_draws_match_the_generator_calls(data, area, patch, seed) -> None:  # noqa: ANN001
    """Rows, then columns, then seasons, each one ``randint`` of the seeded generator, per epoch."""
    grid = data[2]
    sampler = RandomPatchSampler(area, patch, 25, SEASONS, seed=seed, grid=grid)
    for epoch, generator_seed in ((0, seed), (3, seed + 3 * 1_000_003)):
        sampler.set_epoch(epoch)
        row, col, h, w = area
        ph, pw = min(patch, h), min(patch, w)
        g = torch.Generator().manual_seed(generator_seed)
        rows = torch.randint(0, h - ph + 1, (25,), generator=g).tolist()
        cols = torch.randint(0, w - pw + 1, (25,), generator=g).tolist()
        seasons = torch.randint(4, (25,), generator=g).tolist()
        expected = [patch_query((row + r, col + c, ph, pw), SEASONS[s], grid) for r, c, s in zip(rows, cols, seasons)]
        assert list(sampler) == expected


def test_centre_weights_centre_their_share_of_patches_on_heavy_pixels() -> None:
    """With one heavy pixel and share 1 every patch holds it, centred where the area allows; with
    share 0 the draws are those of a sampler without weights; across areas each keeps its own."""
    weights = np.zeros((50, 60))
    weights[30, 45] = 5.0
    heavy = RandomPatchSampler((2, 3, 50, 60), 16, 40, SEASONS, seed=3, centre_weights=weights, weighted_share=1.0)
    assert {q.window for q in heavy} == {(2 + 30 - 8, 3 + 45 - 8, 16, 16)}
    weights[49, 59] = 5.0  # a corner pixel: its patch is clipped into the area, still holding it
    corner = RandomPatchSampler((2, 3, 50, 60), 16, 40, SEASONS, seed=3, centre_weights=weights, weighted_share=1.0)
    assert {q.window for q in corner} == {(24, 40, 16, 16), (36, 47, 16, 16)}
    half = [q.window for q in RandomPatchSampler((2, 3, 50, 60), 16, 400, SEASONS, 3, None, weights, 0.5)]
    share = np.mean([w in {(24, 40, 16, 16), (36, 47, 16, 16)} for w in half])
    assert 0.4 < share < 0.6
    plain = RandomPatchSampler((2, 3, 50, 60), 16, 6, SEASONS, seed=3)
    none = RandomPatchSampler((2, 3, 50, 60), 16, 6, SEASONS, seed=3, centre_weights=weights, weighted_share=0.0)
    assert list(none) == list(plain)
    multi = MultiAreaPatchSampler([(0, 0, 50, 60), (0, 0, 30, 40)], [None, None], 16, 20, SEASONS, 1,
                                  [weights, None], 1.0)
    windows = {(i, q.window) for i, q in multi}
    assert {w for i, w in windows if i == 0} == {(22, 37, 16, 16), (34, 44, 16, 16)}
    assert len({w for i, w in windows if i == 1}) > 1  # the area without weights stays uniform


@pytest.mark.parametrize(("weights", "share"), [(np.zeros((50, 60)), 0.5), (np.ones((5, 5)), 0.5),
                                                (-np.ones((50, 60)), 0.5), (np.ones((50, 60)), 1.5)])
def test_bad_centre_weights_are_refused(weights: np.ndarray, share: float) -> None:
    with pytest.raises(ValueError, match="centre_weights"):
        RandomPatchSampler((2, 3, 50, 60), 16, 4, SEASONS, centre_weights=weights, weighted_share=share)


def test_patch_query_is_a_picklable_geoslice(data) -> None:  # noqa: ANN001
    s1, s2, grid, images, samples = data
    q = patch_query((8, 8, 16, 16), "summer", grid)
    back = pickle.loads(pickle.dumps(q))  # DataLoader workers receive pickled queries
    assert type(back) is PatchQuery and back == q and hash(back) == hash(q)
    assert back.season == "summer" and back.window == (8, 8, 16, 16) and tuple(back) == tuple(q) and len(q) == 3
    assert q != tuple(q) and q != patch_query((8, 8, 16, 16), "winter", grid)
    assert q != RegionQuery(*q, region_id=1, season="summer", window=q.window)
    assert len({q, back, patch_query((8, 9, 16, 16), "summer", grid)}) == 2
    assert repr(q).startswith("PatchQuery(season='summer', window=(8, 8, 16, 16), x=slice(")
    with pytest.raises(TypeError):
        PatchQuery(*q, season="summer")  # the window is missing
    assert same_bits(s2[q]["image"], s2.read_window("summer", q.window))  # the plain TorchGeo dataset
    plain = samples[tuple(q)]  # a plain GeoSlice: same arrays, label over its pixel window
    assert same_bits(plain["s1"], images[q]["s1"]) and same_bits(plain["builtup"], samples[q]["builtup"])


def test_patch_outside_one_sensors_files_reads_as_missing(tmp_path: Path) -> None:
    """S1 covering only part of the grid: TorchGeo finds no S1 file under the right-hand patches
    and tiles, which read as all-NaN S1 (as the pixel-window datasets did), not as an error."""
    root = make_tiny_world(tmp_path / "world")
    for s, season in enumerate(SEASONS):
        write_raster(root / f"S1_{season}.tif", np.ascontiguousarray(s1_array(s)[:, :, :40]), nodata=float("nan"),
                     descriptions=["VV", "VH"])
    s1, s2, grid = open_imagery(root, SEASONS)
    assert grid.shape == (H, W)
    images = SentinelPairs(s1, s2)
    for q in FixedPatchSampler((0, 0, H, W), 16, SEASONS, grid=grid):
        sample = images[q]
        assert same_bits(sample["s1"], s1.read_window(q.season, q.window))
        assert same_bits(sample["s2"], s2.read_window(q.season, q.window))
        assert sample["bounds"] == tuple(q) and sample["season"] == q.season
    far = patch_query((0, 60, 16, 16), "summer", grid)
    assert images[far]["s1"].isnan().all() and not images[far]["s2"].isnan().any()
    with pytest.raises(IndexError):
        images[tuple(far)]  # a plain GeoSlice keeps TorchGeo's answer
    # prediction tiles likewise: every tile reads in every season, NaN S1 where S1 has no file
    for q in TileGridSampler(grid, tile_size=20, margin=8):
        for season in SEASONS:
            sample = images[q.in_season(season)]
            assert same_bits(sample["s1"], s1.read_window(season, q.read))
            assert same_bits(sample["s2"], s2.read_window(season, q.read))
    assert images[TileGridSampler(grid, 20).query((0, 60, 20, 20)).in_season("winter")]["s1"].isnan().all()
