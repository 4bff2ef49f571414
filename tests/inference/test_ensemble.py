"""popcorn.inference.ensemble: weighted running mean, observed shares, per-season weights in predict."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from popcorn.datasets.sentinel import SEASONS, open_imagery
from popcorn.datasets.synthetic.world import make_synthetic_world
from popcorn.errors import PopcornInputError
from popcorn.evaluation.dasymetric import block_sum
from popcorn.inference.ensemble import (
    CheckpointSeasons,
    DihedralMean,
    OBSERVED_WINDOW_PX,
    RunningMean,
    combine_members,
    observed_share,
    season_weights,
)
from popcorn.inference.evaluate import summarise
from popcorn.inference.fast import load_popcorn
from popcorn.inference.maps import PredictSettings, predict
from popcorn.tasks import WeakSupervisionTask


def test_running_mean_equals_numpy_weighted_and_unweighted() -> None:
    rng = np.random.default_rng(0)
    xs = rng.normal(3.0, 2.0, size=(6, 5, 7))
    ws = rng.uniform(0.0, 1.0, size=(6, 5, 7))
    ws[0] = 0.0  # a member that counts nowhere
    ws[1:, 0, 0] = 0.0  # a pixel no member counts at: mean 0, std 0
    plain, weighted = RunningMean(), RunningMean()
    for x, w in zip(xs, ws):
        plain.add(x)
        weighted.add(x, w)
    assert np.allclose(plain.mean, xs.mean(0), atol=1e-12) and np.allclose(plain.std(), xs.std(0), atol=1e-12)
    seen = ws.sum(0) > 0
    mean = np.average(xs[:, seen], axis=0, weights=ws[:, seen])
    var = np.average((xs[:, seen] - mean) ** 2, axis=0, weights=ws[:, seen])
    assert np.allclose(weighted.mean[seen], mean, atol=1e-12)
    assert np.allclose(weighted.std()[seen], np.sqrt(var), atol=1e-12)
    assert weighted.mean[0, 0] == 0.0 and weighted.std()[0, 0] == 0.0


def test_observed_share_is_the_window_mean_of_observed_pixels() -> None:
    rng = np.random.default_rng(1)
    s1 = torch.randn(2, 20, 23)
    s2 = torch.rand(4, 20, 23)
    s1[0, 3:9, 4:12] = float("nan")  # an S1 orbit gap in one band
    s2[:, 12:, 15:] = float("nan")  # a cloud in the corner
    s2[2, rng.integers(0, 20, 10), rng.integers(0, 23, 10)] = float("nan")  # scattered single-band holes
    observed = (torch.isfinite(s1).all(0) & torch.isfinite(s2).all(0)).numpy().astype(float)
    k = 3
    padded = np.pad(observed, k, mode="edge")
    brute = np.array([[padded[i : i + 2 * k + 1, j : j + 2 * k + 1].mean() for j in range(23)] for i in range(20)])
    assert np.allclose(observed_share(s1, s2, k), brute, atol=1e-6)
    assert observed_share(s1, s2, k)[16:, 20:].max() == 0.0  # deep inside the cloud


def test_season_weights_rules() -> None:
    s1 = torch.zeros(2, 40, 40)
    s2 = torch.ones(4, 40, 40)
    gap = s2.clone()
    gap[:, :20] = float("nan")  # winter: the northern half under cloud
    both = gap.clone()
    data = {"summer": (s1, s2), "winter": (s1, gap)}
    assert season_weights(data, "equal", (0, 0, 40, 40)) == {"summer": 1.0, "winter": 1.0}
    w = season_weights(data, "observed", (5, 5, 30, 30))
    assert w["summer"].shape == (30, 30) and np.all(w["summer"] == 1.0)
    assert np.all(w["winter"][:20 - OBSERVED_WINDOW_PX - 5] == 0.0)  # rows 5.. of the window, deep in the gap
    assert np.all(w["winter"][20 + OBSERVED_WINDOW_PX - 5 :] == 1.0)
    unseen = season_weights({"summer": (s1, both), "winter": (s1, gap)}, "observed", (0, 0, 40, 40))
    assert np.all(unseen["summer"][:5] == 1.0) and np.all(unseen["winter"][:5] == 1.0)  # nobody saw it: all alike
    with pytest.raises(ValueError, match="season weights"):
        season_weights(data, "median", (0, 0, 40, 40))


@pytest.fixture(scope="module")
def gapped_world(tmp_path_factory: pytest.TempPathFactory):
    """The 200 px test world with an 80 x 80 px cloud in winter's S2 (rows and cols 60-140)."""
    root = tmp_path_factory.mktemp("ensemble")
    world = make_synthetic_world(root / "world", size_px=200, seed=3, n_regions=12)
    imagery = root / "imagery"
    shutil.copytree(world.imagery_dir, imagery)
    with rasterio.open(imagery / "S2_winter.tif", "r+") as dst:
        bands = dst.read()
        bands[:, 60:140, 60:140] = 0  # nodata
        dst.write(bands)
    torch.manual_seed(7)
    task = WeakSupervisionTask(occupancy_bias_init=0.5)
    ckpt = root / "m.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
    return root, imagery, ckpt


def test_observed_weights_leave_out_the_clouded_season(gapped_world) -> None:
    root, imagery, ckpt = gapped_world
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        maps = {}
        for rule in ("equal", "observed"):
            settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(imagery), seasons=["summer", "winter"],
                                       tile_size=100, overlap=64, write_10m=True, season_weights=rule)
            result = predict(settings, root / rule, progress=False)
            maps[rule] = {k: rasterio.open(p).read(1).astype(np.float64) for k, p in result.outputs.items()}
        s1, s2, _ = open_imagery(str(imagery), ["summer", "winter"])
        model, _ = load_popcorn(ckpt)
        with torch.no_grad():
            summer = model(s1.read_window("summer", (0, 0, 200, 200))[None],
                           s2.read_window("summer", (0, 0, 200, 200))[None])["population"][0, 0].double().numpy()
            weights = season_weights({s: (s1.read_window(s, (0, 0, 200, 200)), s2.read_window(s, (0, 0, 200, 200)))
                                      for s in ("summer", "winter")}, "observed", (0, 0, 200, 200))
    finally:
        torch.set_num_threads(before)
    inside = (slice(60 + OBSERVED_WINDOW_PX, 140 - OBSERVED_WINDOW_PX),) * 2
    observed, equal = maps["observed"]["population_10m"], maps["equal"]["population_10m"]
    left_out = np.abs(observed[inside] - summer[inside]).max()
    kept = np.abs(equal[inside] - summer[inside]).max()
    assert left_out < 1e-6 and kept > 1e-4  # winter's guess left out, which the plain mean keeps
                                            # (an untrained model's maps vary little: 4.6e-4)
    everywhere = (weights["summer"] == 1.0) & (weights["winter"] == 1.0)
    assert everywhere.mean() > 0.5
    assert np.abs(observed - equal)[everywhere].max() < 1e-6  # no gap around: the paper's mean
    assert np.allclose(maps["observed"]["population_1ha"], block_sum(observed), atol=1e-3)
    builtup = maps["observed"]["builtup_score"]
    assert np.all(np.isfinite(builtup)) and builtup.min() >= 0.0 and builtup.max() <= 1.0


def test_unknown_season_weights_refused(gapped_world) -> None:
    root, imagery, ckpt = gapped_world
    settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(imagery), season_weights="median")
    with pytest.raises(PopcornInputError, match="--season-weights must be one of equal, observed"):
        predict(settings, root / "bad", progress=False)


def test_combine_members_mean_and_median() -> None:
    maps = [np.array([[1.0, 5.0]]), np.array([[2.0, 0.0]]), np.array([[9.0, 1.0]])]
    assert np.allclose(combine_members(maps, "mean"), [[4.0, 2.0]])
    assert np.allclose(combine_members(maps, "median"), [[2.0, 1.0]])  # the outlier 9 does not count
    with pytest.raises(ValueError, match="member statistic"):
        combine_members(maps, "mode")
    assert np.allclose(combine_members(maps, "mean", [1.0, 0.0, 3.0]), [[7.0, 2.0]])  # (1 + 27) / 4, (5 + 3) / 4


def test_combine_members_harmonic_follows_the_members_that_place_fewer_people() -> None:
    maps = [np.array([[1.0, 5.0, 4.0, np.nan]]), np.array([[2.0, 0.0, 4.0, 1.0]]), np.array([[4.0, 1.0, 4.0, 2.0]])]
    harmonic = combine_members(maps, "harmonic")
    assert np.isclose(harmonic[0, 0], 3 / (1 + 1 / 2 + 1 / 4))  # 1.714: below the mean 2.33 and the median 2
    assert harmonic[0, 1] == 0.0  # one member puts nobody there: nobody in the ensemble
    assert np.isclose(harmonic[0, 2], 4.0)  # members that agree keep their value
    assert np.isnan(harmonic[0, 3])  # nodata stays nodata
    stack = np.stack(maps)[:, 0, :3]
    assert (harmonic[0, :3] <= np.exp(np.log(np.maximum(stack, 1e-12)).mean(0)) + 1e-9).all()  # <= geometric mean
    weighted = combine_members(maps, "harmonic", [1.0, 0.0, 3.0])
    assert np.isclose(weighted[0, 0], 1 / (0.25 / 1 + 0.75 / 4))  # 2.29: weights as in the mean


def test_checkpoint_seasons_mean_and_median() -> None:
    maps = [np.array([[1.0, 5.0]]), np.array([[2.0, 0.0]]), np.array([[9.0, 1.0]]), np.array([[4.0, 4.0]])]
    mean, median = CheckpointSeasons("mean"), CheckpointSeasons("median")
    for m in maps:
        mean.add(m)
        median.add(m)
    assert np.allclose(mean.combined(), [[4.0, 2.5]])
    assert np.allclose(median.combined(), [[3.0, 2.5]])  # four seasons: the mean of the middle two
    with pytest.raises(ValueError, match="season statistic"):
        CheckpointSeasons("trimmed")


@pytest.fixture(scope="module")
def three_members(gapped_world):
    """Three checkpoints whose maps differ per pixel (occupancy bias 0.2, 0.5, 2.0), each one's
    summer + autumn map alone, and a function predicting them together with a member statistic
    (other ``PredictSettings`` fields, e.g. the seasons, as keywords)."""
    root, imagery, _ = gapped_world
    ckpts = []
    for k, bias in enumerate((0.2, 0.5, 2.0)):
        torch.manual_seed(100 + k)
        task = WeakSupervisionTask(occupancy_bias_init=bias)
        ckpts.append(root / f"member{k}.ckpt")
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpts[-1])

    def run(paths: list, statistic: str, name: str, **options) -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            settings = PredictSettings(**{"seasons": ["summer", "autumn"], "tile_size": 100, **options},
                                       checkpoints=[str(p) for p in paths], imagery_root=str(imagery), overlap=64,
                                       write_10m=True, member_statistic=statistic)
            result = predict(settings, root / name, progress=False)
        finally:
            torch.set_num_threads(before)
        out = {k: rasterio.open(p).read(1).astype(np.float64) for k, p in result.outputs.items()}
        with rasterio.open(result.outputs["population_1ha"]) as src:
            out["tags"] = src.tags()
        out["result"] = result
        return out

    alone = [run([p], "mean", f"alone{k}") for k, p in enumerate(ckpts)]
    return root, ckpts, alone, run


def test_member_median_is_the_median_of_each_checkpoints_season_mean(three_members) -> None:
    _, ckpts, alone, run = three_members
    median, mean = run(ckpts, "median", "median"), run(ckpts, "mean", "mean")
    stack = np.stack([a["population_10m"] for a in alone])
    assert np.allclose(median["population_10m"], np.median(stack, axis=0), atol=1e-5)
    assert np.allclose(mean["population_10m"], stack.mean(0), atol=1e-5)
    assert np.abs(median["population_10m"] - mean["population_10m"]).max() > 1e-3  # the option changes the map
    middle = (stack.min(0) < median["population_10m"]) & (median["population_10m"] < stack.max(0))
    assert middle.mean() > 0.5  # per pixel, not one member's map chosen whole
    assert np.allclose(median["population_1ha"], block_sum(median["population_10m"]), atol=1e-3)
    assert np.allclose(median["population_10m_std"], mean["population_10m_std"], atol=1e-6)  # spread: all members
    assert median["tags"]["member_statistic"] == "median" and "median" in median["tags"]["units"]
    assert mean["tags"]["member_statistic"] == "mean"


def test_member_harmonic_is_the_harmonic_mean_of_each_checkpoints_season_mean(three_members) -> None:
    _, ckpts, alone, run = three_members
    harmonic, median = run(ckpts, "harmonic", "harmonic"), run(ckpts, "median", "median")
    stack = np.stack([a["population_10m"] for a in alone])
    positive = (stack > 0).all(0)
    expected = np.where(positive, len(stack) / (1 / np.where(positive, stack, 1.0)).sum(0), 0.0)
    assert np.allclose(harmonic["population_10m"], expected, rtol=1e-4, atol=1e-5)
    assert (harmonic["population_10m"] <= stack.mean(0) + 1e-5).all()
    assert np.abs(harmonic["population_10m"] - median["population_10m"]).max() > 1e-3  # the option changes the map
    assert np.allclose(harmonic["population_1ha"], block_sum(harmonic["population_10m"]), atol=1e-3)
    assert harmonic["tags"]["member_statistic"] == "harmonic" and "harmonic" in harmonic["tags"]["units"]


def test_unknown_member_statistic_refused(gapped_world) -> None:
    root, imagery, ckpt = gapped_world
    settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(imagery), member_statistic="trimmed")
    expected = "--member-statistic must be one of mean, median, collocation, harmonic"
    with pytest.raises(PopcornInputError, match=expected):
        predict(settings, root / "bad_statistic", progress=False)


SEASONS_WITH_CLOUD = ["spring", "summer", "winter"]  # winter's S2 has the 80 x 80 px cloud
ONE_TILE = {"tile_size": 200, "seasons": SEASONS_WITH_CLOUD}  # one tile: tiling is tested elsewhere


@pytest.fixture(scope="module")
def seasons_by_hand(three_members) -> np.ndarray:
    """Each of the three checkpoints' map of each season in ``SEASONS_WITH_CLOUD``: the model on the
    whole 200 x 200 px raster, by hand (checkpoint x season x H x W)."""
    root, ckpts, _, _ = three_members
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s1, s2, _ = open_imagery(str(root / "imagery"), SEASONS_WITH_CLOUD)
        inputs = [(s1.read_window(s, (0, 0, 200, 200))[None], s2.read_window(s, (0, 0, 200, 200))[None])
                  for s in SEASONS_WITH_CLOUD]
        with torch.no_grad():
            return np.stack([[load_popcorn(p)[0].eval()(*x)["population"][0, 0].double().numpy() for x in inputs]
                             for p in ckpts])
    finally:
        torch.set_num_threads(before)


def test_season_median_is_each_checkpoints_per_pixel_median_over_its_seasons(three_members, seasons_by_hand) -> None:
    """``season_statistic="median"``: each checkpoint's map is the per-pixel median of its seasonal
    maps (each the model on the whole raster, by hand), then the checkpoints are combined by the
    member statistic; the clouded winter no longer pulls the map; the spread stays over every
    checkpoint x season; 1 ha cells sum the 10 m map; the tags say so."""
    _, ckpts, _, run = three_members
    alone = seasons_by_hand
    maps = {members: run(ckpts, members, f"season_median_members_{members}", season_statistic="median", **ONE_TILE)
            for members in ("mean", "median")}
    one_season = run(ckpts[:1], "mean", "season_median_one", **{**ONE_TILE, "seasons": ["summer"]},
                     season_statistic="median")
    per_checkpoint = np.median(alone, axis=1)
    assert np.allclose(maps["mean"]["population_10m"], per_checkpoint.mean(0), atol=1e-5)
    assert np.allclose(maps["median"]["population_10m"], np.median(per_checkpoint, axis=0), atol=1e-5)
    cloud = (slice(70, 130),) * 2
    moved = np.abs(maps["mean"]["population_10m"] - alone.mean((0, 1)))
    assert moved[cloud].max() > 1e-4  # under the cloud winter's guess is the odd season out
    for statistic in ("mean", "median"):
        assert np.allclose(maps[statistic]["population_1ha"], block_sum(maps[statistic]["population_10m"]), atol=1e-3)
        assert maps[statistic]["tags"]["season_statistic"] == "median"
        assert "season medians" in maps[statistic]["tags"]["units"]
        assert np.allclose(maps[statistic]["population_10m_std"], alone.std((0, 1)), atol=1e-5)
    assert np.allclose(one_season["population_10m"], alone[0, 1], atol=1e-5)  # one season: its own map


def test_season_collocation_weights_each_checkpoints_seasons(three_members, seasons_by_hand) -> None:
    """``season_statistic="collocation"``: each checkpoint's seasons are weighted by the N-cornered hat
    of its own seasonal 1 ha maps (by hand: the model on the whole raster), the checkpoints then combined
    by the member statistic (here member collocation, of their season-weighted 1 ha maps, from the same
    first pass); ``season_collocation_weights.csv`` and the tags carry the weights."""
    from popcorn.inference.collocation import member_weights, season_collocation_weights_of

    root, ckpts, _, run = three_members
    alone = seasons_by_hand
    cells = np.stack([[block_sum(season) for season in ckpt] for ckpt in alone])
    expected = season_collocation_weights_of([str(p) for p in ckpts], SEASONS_WITH_CLOUD, lambda: iter([cells]))
    assert np.ptp(expected.weights, axis=1).min() > 0.01  # the seasons do not count alike
    per_checkpoint = np.einsum("ks,kshw->khw", expected.weights, alone)
    got = run(ckpts, "collocation", "season_collocation", season_statistic="collocation", **ONE_TILE)
    result = got["result"]
    assert np.allclose(result.season_collocation_weights.weights, expected.weights, atol=1e-4)
    members_w = member_weights([str(p) for p in ckpts], lambda: iter([expected.combine(cells)]))
    assert np.allclose(result.member_weights.weights, members_w.weights, atol=1e-4)
    assert np.allclose(got["population_10m"], np.tensordot(members_w.weights, per_checkpoint, 1), atol=1e-5)
    plain = np.tensordot(members_w.weights, alone.mean(1), 1)
    assert np.abs(got["population_10m"] - plain).max() > 1e-4  # not the checkpoints' plain season means
    assert np.allclose(got["population_1ha"], block_sum(got["population_10m"]), atol=1e-3)
    assert got["tags"]["season_statistic"] == "collocation" and "own error variance" in got["tags"]["units"]
    tagged = [[float(w) for w in ckpt.split(",")] for ckpt in got["tags"]["season_collocation_weights"].split(";")]
    assert np.allclose(tagged, expected.weights, atol=2e-4)  # checkpoints by ";", seasons by ","
    assert len((root / "season_collocation" / "season_collocation_weights.csv").read_text().splitlines()) == 10
    assert not any(p.name.startswith(".popcorn-partial") for p in (root / "season_collocation").iterdir())


def test_season_statistic_refusals(gapped_world) -> None:
    root, imagery, ckpt = gapped_world
    for options, message in (({"season_statistic": "trimmed"},
                              "--season-statistic must be one of mean, median, collocation"),
                             ({"season_statistic": "median", "season_weights": "observed"},
                              "--season-statistic median sets the seasons' weights itself"),
                             ({"season_statistic": "collocation", "seasons": ["summer", "winter"]},
                              "--season-statistic collocation needs at least 3 seasons")):
        settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(imagery), **options)
        with pytest.raises(PopcornInputError, match=message):
            predict(settings, root / "bad_season_statistic", progress=False)


def _one_option_both_ways(gapped_world, season: str, option: str) -> tuple[dict, dict]:
    """The test checkpoint's map of ``season`` with a boolean ``PredictSettings`` option off and on:
    10 m population maps and the products' tag of that option, keyed False / True."""
    root, imagery, ckpt = gapped_world
    maps, tags = {}, {}
    for value in (False, True):
        settings = PredictSettings(checkpoints=[str(ckpt)], imagery_root=str(imagery), seasons=[season],
                                   tile_size=100, overlap=64, write_10m=True, **{option: value})
        result = predict(settings, root / f"{option}_{value}", progress=False)
        maps[value] = rasterio.open(result.outputs["population_10m"]).read(1).astype(np.float64)
        tags[value] = rasterio.open(result.outputs["population_1ha"]).tags()[option]
    return maps, tags


def test_season_gap_fill_reaches_the_maps(gapped_world) -> None:
    """``season_gap_fill``: winter's map under its 80 x 80 px cloud is the model on winter's S1 and
    the other seasons' mean S2 there; away from the cloud it is the plain map; the products say so."""
    root, imagery, ckpt = gapped_world
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        maps, tags = _one_option_both_ways(gapped_world, "winter", "season_gap_fill")
        raw = open_imagery(str(imagery), SEASONS, max_gap_px=0)[:2]  # as on disk, NaN = missing
        full = (0, 0, 200, 200)
        filled = []
        for sensor in raw:  # winter's own gaps and the cloud: the other seasons' mean, value by value
            winter = sensor.read_window("winter", full).numpy()
            others = np.stack([sensor.read_window(s, full).numpy() for s in ("spring", "summer", "autumn")])
            mean = np.nansum(others, 0) / np.maximum(np.isfinite(others).sum(0), 1)
            filled.append(torch.from_numpy(np.where(np.isnan(winter), mean, winter).astype(np.float32))[None])
        assert raw[1].read_window("winter", full).isnan()[:, 60:140, 60:140].all()
        model, _ = load_popcorn(ckpt)
        with torch.no_grad():
            by_hand = model(*filled)["population"]
    finally:
        torch.set_num_threads(before)
    assert tags == {False: "false", True: "true"}
    assert np.allclose(maps[True], by_hand[0, 0].double().numpy(), atol=1e-5)
    inside = (slice(70, 130),) * 2
    assert np.abs(maps[True][inside] - maps[False][inside]).max() > 1e-4  # the cloud no longer reads as band means
    assert np.abs(maps[True][:20] - maps[False][:20]).max() < 1e-6  # far from the cloud: the paper's map


def test_collocation_weights_the_members_by_their_own_error_variance(three_members, caplog) -> None:
    """``member_statistic="collocation"``: the map is the mean of the checkpoints' maps weighted as
    ``member_weights.csv`` says, and those weights are the N-cornered hat of the checkpoints' own 1 ha
    maps (what predicting each alone gives): the outlying member (bias 2.0) counts least."""
    from popcorn.inference.collocation import member_weights

    root, ckpts, alone, run = three_members
    weighted = run(ckpts, "collocation", "collocation")
    result = weighted["result"]
    expected = member_weights([str(p) for p in ckpts], lambda: iter([np.stack([a["population_1ha"] for a in alone])]))
    assert np.allclose(result.member_weights.weights, expected.weights, atol=1e-4)
    assert np.allclose(result.member_weights.own_variance, expected.own_variance, rtol=1e-3)
    w = result.member_weights.weights
    assert abs(w.sum() - 1.0) < 1e-9 and np.argmin(w) == 2 and w.max() < 0.99
    stack = np.stack([a["population_10m"] for a in alone])
    assert np.allclose(weighted["population_10m"], np.tensordot(w, stack, 1), atol=1e-5)
    assert np.abs(weighted["population_10m"] - stack.mean(0)).max() > 1e-3  # not the plain mean
    assert np.allclose(weighted["population_1ha"], block_sum(weighted["population_10m"]), atol=1e-3)
    csv = (root / "collocation" / "member_weights.csv").read_text().splitlines()
    assert csv[0] == "checkpoint,own_error_variance,weight,cells" and len(csv) == 4
    assert weighted["tags"]["member_statistic"] == "collocation"
    assert f"member2.ckpt {w[2]:.3f}" in summarise(result)  # the terminal summary names each weight
    assert weighted["tags"]["member_weights"] == ";".join(f"{x:.4f}" for x in w)
    assert not any(p.name.startswith(".popcorn-partial") for p in (root / "collocation").iterdir())
    with caplog.at_level("WARNING"):  # two checkpoints: the pairs cannot tell their errors apart
        two = run(ckpts[:2], "collocation", "collocation_two")
    assert "at least 3 checkpoints" in caplog.text and two["result"].member_weights is None
    assert np.allclose(two["population_10m"], stack[:2].mean(0), atol=1e-5)


class _Ramp(torch.nn.Module):
    """A toy POPCORN-like model that is not equivariant: population grows with the column (a ramp
    plus an asymmetric 3 x 3 filter of S2's first band), occupancy undefined where built-up < 0.3."""

    def forward(self, s1: torch.Tensor, s2: torch.Tensor) -> dict[str, torch.Tensor]:
        ramp = torch.arange(s2.shape[-1], dtype=s2.dtype).expand_as(s2[:, :1])
        kernel = torch.arange(9, dtype=s2.dtype).reshape(1, 1, 3, 3)
        builtup = torch.sigmoid(F.conv2d(s2[:, :1], kernel, padding=1) + s1[:, :1])
        population = builtup * (1 + ramp)
        occupancy = torch.where(builtup < 0.3, float("nan"), population / builtup)
        return {"population": population, "builtup_score": builtup, "occupancy": occupancy}


def test_dihedral_mean_is_the_mean_over_the_eight_poses_and_equivariant() -> None:
    gen = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(1, 2, 6, 9, generator=gen), torch.randn(1, 4, 6, 9, generator=gen)
    model, tta = _Ramp(), DihedralMean(_Ramp())
    out = tta(s1, s2)
    assert out["population"].shape == (1, 1, 6, 9)  # a non-square tile keeps its shape
    by_hand = []
    for turns in range(4):
        for mirrored in (False, True):
            def pose(x: torch.Tensor) -> torch.Tensor:
                x = torch.rot90(x, turns, (-2, -1))
                return torch.flip(x, (-1,)) if mirrored else x

            y = model(pose(s1), pose(s2))["population"]
            y = torch.flip(y, (-1,)) if mirrored else y
            by_hand.append(torch.rot90(y, -turns, (-2, -1)))
    assert torch.allclose(out["population"], torch.stack(by_hand).mean(0), atol=1e-6)
    assert not torch.allclose(out["population"], model(s1, s2)["population"])  # the ramp alone is not
    # averaged over the whole group, the wrapped model answers a turned tile with the turned map
    turned = tta(torch.rot90(s1, 1, (-2, -1)), torch.rot90(s2, 1, (-2, -1)))
    assert torch.allclose(turned["population"], torch.rot90(out["population"], 1, (-2, -1)), atol=1e-5)
    # occupancy: the mean over the poses that define it, NaN only where none does
    occ = out["occupancy"]
    assert torch.isnan(occ).sum() < torch.isnan(model(s1, s2)["occupancy"]).sum()
    assert torch.isfinite(occ[out["builtup_score"] > 0.5]).all()


def test_test_time_augmentation_reaches_the_maps(gapped_world) -> None:
    """``test_time_augmentation``: the tiled map equals the 8-pose mean of the model on the whole
    raster, differs from the plain map, and says so in its tags."""
    root, imagery, ckpt = gapped_world
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        maps, tags = _one_option_both_ways(gapped_world, "summer", "test_time_augmentation")
        s1, s2 = (sensor.read_window("summer", (0, 0, 200, 200))[None] for sensor in open_imagery(str(imagery), ["summer"])[:2])
        model, _ = load_popcorn(ckpt)
        with torch.no_grad():
            by_hand = DihedralMean(model.eval())(s1, s2)["population"][0, 0].double().numpy()
    finally:
        torch.set_num_threads(before)
    assert tags == {False: "none", True: "8 flips and quarter turns"}
    assert np.allclose(maps[True], by_hand, atol=1e-5)
    assert np.abs(maps[True] - maps[False]).max() > 1e-4
