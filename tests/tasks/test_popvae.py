"""popVAE (issue 5): model shapes, KL term, training, tiled prediction through the shared engine,
normalisation, census sums, distillation from a POPCORN map."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from paths import ROOT, TUNISIA
from rasterio.transform import from_origin

from popcorn.datamodules.pixel import PixelDataModule
from popcorn.datasets.covariates import CovariateStack, Normalizer, extract_patches, nonempty_patches
from popcorn.inference.popvae import PopVAERunner, evaluate_region_raster, predict_map
from popcorn.io import write_geotiff
from popcorn.models import PopVAE
from popcorn.models.popvae import LOG_CLIP_MAX, kl_divergence
from popcorn.samplers.pixels import PixelBatchSampler, PixelSampler
from popcorn.tasks import PixelRegressionTask

torch.set_num_threads(1)

CRS = "EPSG:32632"
T100 = from_origin(500000.0, 4000000.0, 100.0, 100.0)
H, W = 24, 20


def tiny_covariates(root: Path) -> tuple[list[str], str]:
    """Two covariate rasters (3 bands + 1 band) on a 24 x 20 grid at 100 m and a reference whose
    log1p is a smooth function of them. Rows 0..7 are all zero (so the patches of rows 0..2 are
    empty) and (5, 5) is nodata."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    built = np.clip(1.5 - np.hypot(yy - 12, xx - 10) / 6, 0, None)
    a = np.stack([built * 50, 1000 + 10 * xx + rng.normal(0, 5, (H, W)), np.sin(yy / 3)]).astype(np.float32)
    b = (rng.random((1, H, W)) * built).astype(np.float32)
    a[:, :8] = 0
    b[:, :8] = 0
    a[:, 5, 5] = -3.4e38
    b[:, 5, 5] = -3.4e38
    pop = np.expm1(3.0 * built + b[0]).astype(np.float32)
    pop[:8] = 0
    paths = [root / "a.tif", root / "b.tif"]
    write_geotiff(paths[0], a, transform=T100, crs=CRS, nodata=-3.4e38, band_names=["built", "x", "sin"])
    write_geotiff(paths[1], b, transform=T100, crs=CRS, nodata=-3.4e38, band_names=["noise"])
    ref = root / "ref.tif"
    write_geotiff(ref, pop, transform=T100, crs=CRS, nodata=-999.0)
    return [str(p) for p in paths], str(ref)


@pytest.fixture()
def tiny(tmp_path: Path) -> tuple[list[str], str]:
    return tiny_covariates(tmp_path)


def small_task(bands: int = 4, **kw) -> PixelRegressionTask:
    torch.manual_seed(0)
    return PixelRegressionTask(in_bands=bands, latent_dim=16, **kw)


# ----------------------------------------------------------------------------- model
def test_popvae_shapes_and_defaults():
    net = PopVAE(in_bands=10)  # paper values: 11 x 11 patch, latent 900
    assert (net.patch_size, net.latent_dim) == (11, 900)
    x = torch.rand(3, 10, 11, 11)
    out = net(x)
    assert out["pred"].shape == (3,) and (out["pred"] >= 0).all()  # softplus
    assert out["recon"].shape == x.shape and out["recon"].min() >= 0 and out["recon"].max() <= 1
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 900)
    net.eval()
    assert torch.equal(net(x)["z"], net(x)["mu"])  # deterministic in eval mode
    small = PopVAE(in_bands=2, patch_size=5, latent_dim=4, conv_width=4, res_width=8, dense_width=6)
    assert small(torch.rand(2, 2, 5, 5))["recon"].shape == (2, 2, 5, 5)
    with pytest.raises(ValueError, match="expects patches"):
        net(torch.rand(1, 9, 11, 11))
    with pytest.raises(ValueError, match="odd"):
        PopVAE(3, patch_size=10)


def test_residual_block_is_the_reference():
    """The reference's block (IssaNasralli/popVAE, popVAE_model/popVAE_full.py, residual_block):
    input + 1x1 projection of a branch of two ReLU 3x3 convolutions, no ReLU after the add."""
    from popcorn.models.popvae import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(16, 32)
    # structure: 16 -> 32 -> 32 in the branch, the 1x1 projection back to the input's 16
    assert block.conv1.weight.shape == (32, 16, 3, 3) and block.conv2.weight.shape == (32, 32, 3, 3)
    assert block.proj.weight.shape == (16, 32, 1, 1) and block.out_channels == 16
    x = torch.randn(2, 16, 11, 11)
    # a zero projection gives the identity -- negative inputs included (no ReLU after the add)
    with torch.no_grad():
        block.proj.weight.zero_()
        block.proj.bias.zero_()
    assert (x < 0).any() and torch.equal(block(x), x)
    # with a projection: output = x + proj(relu(conv2(relu(conv1(x))))), checked term by term
    with torch.no_grad():
        block.proj.weight.normal_()
        block.proj.bias.fill_(-5.0)  # pushes the sum below 0 where a ReLU after the add would clip
    from torch.nn import functional as F

    branch = F.relu(block.conv2(F.relu(block.conv1(x))))
    expected = x + block.proj(branch)
    out = block(x)
    torch.testing.assert_close(out, expected)
    assert (out < 0).any()
    # the branch's second conv is followed by a ReLU: a branch with negative pre-activations only
    # contributes the projection's bias
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.fill_(-1.0)
    torch.testing.assert_close(block(x), x - 5.0)
    # equal widths: no projection, as the reference adds none then
    assert isinstance(ResidualBlock(8, 8).proj, torch.nn.Identity)


def test_popvae_uses_the_reference_block_and_keeps_the_old_one_for_old_checkpoints(tmp_path: Path):
    from popcorn.models.popvae import ProjectedShortcutBlock, ResidualBlock

    net = PopVAE(in_bands=10)
    assert isinstance(net.enc_res, ResidualBlock) and net.residual == "reference"
    assert net.enc_dense.in_features == 16 * 11 * 11  # the block keeps conv_width channels
    old = PopVAE(in_bands=10, residual="projected_shortcut")
    assert isinstance(old.enc_res, ProjectedShortcutBlock) and old.enc_dense.in_features == 32 * 11 * 11
    with pytest.raises(ValueError, match="residual"):
        PopVAE(in_bands=3, residual="other")
    # a checkpoint saved before the option existed (no `residual` hyper-parameter) holds the old
    # block's weights: it loads with that block and predicts exactly as before
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    legacy = PixelRegressionTask(in_bands=4, latent_dim=8, patch_size=5, residual="projected_shortcut")
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(legacy)
    ckpt = tmp_path / "legacy.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    del raw["hyper_parameters"]["residual"]
    torch.save(raw, ckpt)
    loaded = PixelRegressionTask.load_from_checkpoint(ckpt)
    assert loaded.hparams.residual == "projected_shortcut"
    assert isinstance(loaded.model.enc_res, ProjectedShortcutBlock)
    x = torch.rand(3, 4, 5, 5)
    legacy.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.model.predict_log(x), legacy.model.predict_log(x))
    # a new checkpoint keeps the reference block
    new = PixelRegressionTask(in_bands=4, latent_dim=8, patch_size=5)
    trainer.strategy.connect(new)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    again = PixelRegressionTask.load_from_checkpoint(tmp_path / "new.ckpt")
    assert again.hparams.residual == "reference" and isinstance(again.model.enc_res, ResidualBlock)


def test_kl_divergence_hand_values():
    zeros = torch.zeros(4, 900)
    assert kl_divergence(zeros, zeros).item() == 0.0
    assert kl_divergence(torch.ones(4, 900), zeros).item() == pytest.approx(0.5 * 900)  # 0.5 per dim
    # sigma^2 = 2, mu = 0: -0.5 (1 + ln 2 - 2) per dim; averaged over samples, summed over dims
    lv = torch.full((2, 3), math.log(2.0))
    assert kl_divergence(torch.zeros(2, 3), lv).item() == pytest.approx(3 * 0.5 * (1 - math.log(2.0)), rel=1e-6)
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert kl_divergence(mu, torch.zeros(2, 2)).item() == pytest.approx(0.25)  # (0.5 + 0) / 2 samples


# ----------------------------------------------------------------------------- data
def test_stack_preprocessing_floor_merge_and_nodata(tmp_path: Path):
    x = np.ones((4, 6, 6), np.float32) * np.array([1, 10, 20, 30], np.float32)[:, None, None]
    x[:, 0, 0] = -3.4e38
    x[0, 1, 1] = 7  # raster nodata value (7) -> 0
    p = tmp_path / "c.tif"
    write_geotiff(p, x, transform=T100, crs=CRS, nodata=7.0, band_names=["dem", "f1", "f2", "f3"])
    stack = CovariateStack([p], floor_bands=[1, 2, 3])
    assert stack.band_names == ["dem", "floors_weighted"]
    data, missing = stack.read_window(-1, 7, 0, 6)
    assert data.shape == (2, 8, 6)
    assert np.isnan(data[:, 0]).all() and np.isnan(data[:, -1]).all()  # beyond the grid
    assert data[1, 3, 3] == pytest.approx(0.7 * 10 + 0.13 * 20 + 0.17 * 30)
    assert (data[:, 1, 0] == 0).all() and missing[1, 0] and missing.sum() == 1  # -3.4e38 -> 0
    assert data[0, 2, 1] == 0 and not missing[2, 1]
    with pytest.raises(ValueError, match="floor_bands"):
        CovariateStack([p], floor_bands=[1, 2, 9])


def test_sampler_split_and_empty_patches():
    raw = np.zeros((2, 30, 30), np.float32)
    raw[0, 10, 10] = 1.0  # one non-zero value: only patches within 2 px of it are non-empty (P=5)
    ne = nonempty_patches(np.pad(raw, ((0, 0), (2, 2), (2, 2)), constant_values=np.nan), 5)
    assert ne.sum() == 25 and ne[8:13, 8:13].all()
    valid = np.ones((40, 50), bool)
    valid[:, :10] = False
    s = PixelSampler(valid, fraction=0.5, split=(0.7, 0.15, 0.15), seed=1)
    n = len(s.train) + len(s.val) + len(s.test)
    assert n == 800 and (len(s.train), len(s.val)) == (560, 120)
    allidx = np.concatenate([s.train, s.val, s.test])
    assert len(np.unique(allidx)) == n and valid.ravel()[allidx].all()
    batches = list(PixelBatchSampler(10, 4, shuffle=True, seed=0))
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(np.concatenate(batches)) == list(range(10))


def test_patch_extraction_matches_slicing():
    padded = torch.arange(2 * 9 * 8, dtype=torch.float32).view(2, 9, 8)  # grid 5 x 4, r = 2
    p = extract_patches(padded, np.array([0, 4, 2]), np.array([3, 0, 1]), 5)
    assert p.shape == (3, 2, 5, 5)
    assert torch.equal(p[0], padded[:, 0:5, 3:8]) and torch.equal(p[1], padded[:, 4:9, 0:5])


# ----------------------------------------------------------------------------- training
def test_loss_falls_on_tiny_world(tiny):
    cov, ref = tiny
    dm = PixelDataModule(covariates=cov, reference=ref, batch_size=32, seed=0)
    dm.setup("fit")
    assert dm.num_bands == 4 and len(dm.train_set) > 100
    assert not np.isin(np.concatenate([dm.sampler.train, dm.sampler.val]), np.arange(3 * W)).any()  # empty patches
    task = small_task(kl_weight=0.01)
    opt = torch.optim.Adam(task.parameters(), lr=3e-3)
    batch = dm.train_set[np.arange(len(dm.train_set))]
    task.eval()
    with torch.no_grad():
        before = task.losses(batch)
    task.train()
    for _ in range(3):
        for idx in PixelBatchSampler(len(dm.train_set), 32, seed=0):
            loss = task.losses(dm.train_set[idx])["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    task.eval()
    with torch.no_grad():
        after = task.losses(batch)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["pred"] < before["pred"]


def test_normalisation_stored_in_json_and_checkpoint_and_reused(tiny, tmp_path: Path):
    from lightning.pytorch import Trainer

    cov, ref = tiny
    norm_json = tmp_path / "run" / "normalization.json"
    dm = PixelDataModule(covariates=cov, reference=ref, batch_size=64, normalization_out=str(norm_json))
    task = PixelRegressionTask(latent_dim=8)  # in_bands from the data module
    trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      enable_checkpointing=False, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    stored = json.loads(norm_json.read_text())
    assert task.hparams.in_bands == 4 and task.hparams.normalization == stored
    assert stored["band_names"] == ["built", "x", "sin", "noise"]
    assert stored["min"][0] == 0.0 and stored["max"][0] == pytest.approx(75.0, rel=1e-3)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = PixelRegressionTask.load_from_checkpoint(ckpt)
    assert loaded.hparams.normalization == stored and loaded.model.in_bands == 4
    # a data module given the JSON reuses it instead of refitting on its (different) data
    other = Normalizer(np.zeros(4), np.full(4, 2.0), stored["band_names"])
    other_json = other.save(tmp_path / "other.json")
    dm2 = PixelDataModule(covariates=cov, reference=ref, normalization=str(other_json))
    dm2.setup("fit")
    assert dm2.normalizer.to_dict() == other.to_dict()
    # a checkpointed task pushes its stored normalisation into a data module that fitted another
    dm3 = PixelDataModule(covariates=cov, reference=ref, normalization=str(other_json))
    dm3.setup("fit")
    t3 = Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                 enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    t3.fit(loaded, datamodule=dm3)
    assert dm3.normalizer.to_dict() == stored and dm3.train_set.normalizer.to_dict() == stored


# ----------------------------------------------------------------------------- prediction
def _read_map(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        a = src.read(1)
        return np.where(a == src.nodata, np.nan, a)


def test_tiled_prediction_equals_one_piece_resumes_and_matches_training_patches(tiny, tmp_path: Path):
    cov, ref = tiny
    dm = PixelDataModule(covariates=cov, reference=ref)
    dm.setup("fit")
    task = small_task()
    with torch.no_grad():  # a sizeable head bias so predictions are not all clipped to 0
        task.model.head_out.bias.fill_(2.0)
    stack = CovariateStack(cov)
    r = task.model.patch_size // 2
    # one piece, outside the engine: the model runner on the whole grid and its 5 px context
    one = PopVAERunner(task, dm.normalizer, batch_size=100_000)(
        (0, 0, H, W), (-r, -r, H + 2 * r, W + 2 * r), stack.read_window(-r, H + r, -r, W + r))["population"]
    whole = predict_map(task, stack, dm.normalizer, tmp_path / "whole.tif", tile_size=max(H, W), batch_size=10_000)
    tiles: list = []
    tiled = predict_map(task, stack, dm.normalizer, tmp_path / "tiled.tif", tile_size=7, batch_size=7,
                        on_tile=tiles.append)
    assert len(tiles) == 4 * 3 and not (tmp_path / ".tiled.tif.partial").exists()
    with rasterio.open(whole) as a:
        assert a.crs == CRS and a.transform == T100 and a.nodata == -1.0 and a.shape == (H, W)
        tags = a.tags()
        assert tags["model"] == "popVAE" and json.loads(tags["normalization"]) == dm.normalizer.to_dict()
        assert tags["log_clip"] == f"[0, {LOG_CLIP_MAX}]" and len(tags["model_sha256"]) == 64
    wa, wb = _read_map(whole), _read_map(tiled)
    np.testing.assert_allclose(wa, one, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(wb, one, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert np.isnan(wa[5, 5]) and np.isnan(wa).sum() == 1  # nodata covariates -> nodata
    assert (wa[:3] == 0).all() and (wa[3:][~np.isnan(wa[3:])] > 0).all()  # empty patches -> 0 people
    assert np.nanmax(wa) <= math.expm1(LOG_CLIP_MAX) + 1e-3 and (wa[~np.isnan(wa)] >= 0).all()
    # the map equals the model applied to the training patches of the same pixels
    batch = dm.train_set[np.arange(20)]
    task.eval()
    with torch.no_grad():
        direct = torch.expm1(task.model.predict_log(batch["patch"], batch["pixel"])).numpy()
    rows, cols = np.divmod(batch["index"].numpy(), W)
    np.testing.assert_allclose(wa[rows, cols], direct, rtol=1e-5)
    # resume (the engine POPCORN uses): a crash leaves no map; another model discards the partial
    # tiles; the same model computes only the missing tiles and gives the same map
    out, first, other, second = tmp_path / "crash.tif", [], [], []
    with pytest.raises(KeyboardInterrupt):
        predict_map(task, stack, dm.normalizer, out, tile_size=7, batch_size=7, stop_after=5,
                    on_tile=first.append)
    assert not out.exists() and (tmp_path / ".crash.tif.partial" / "state.json").exists()
    changed = small_task()
    with torch.no_grad():
        changed.model.head_out.bias.fill_(1.0)
    with pytest.raises(KeyboardInterrupt):
        predict_map(changed, stack, dm.normalizer, out, tile_size=7, stop_after=12, on_tile=other.append)
    assert len(other) == 12  # nothing reused from the other model's tiles
    with pytest.raises(KeyboardInterrupt):
        predict_map(task, stack, dm.normalizer, out, tile_size=7, batch_size=7, stop_after=5,
                    on_tile=first.append)
    predict_map(task, stack, dm.normalizer, out, tile_size=7, batch_size=7, on_tile=second.append)
    assert len(second) == 7 and not set(first) & set(second)
    np.testing.assert_array_equal(_read_map(out), wb)  # same settings: bit for bit
    # a finished map is reused as it is (no tile, file untouched); other tags or resume=False predict anew
    stamp, again = out.stat().st_mtime_ns, []
    assert predict_map(task, stack, dm.normalizer, out, tile_size=7, on_tile=again.append) == out
    assert again == [] and out.stat().st_mtime_ns == stamp and (tmp_path / "crash.prediction.json").exists()
    predict_map(task, stack, dm.normalizer, out, tile_size=7, tags={"checkpoint": "x"}, on_tile=again.append)
    assert len(again) == 12
    predict_map(task, stack, dm.normalizer, out, tile_size=7, tags={"checkpoint": "x"}, resume=False,
                on_tile=again.append)
    assert len(again) == 24


# ----------------------------------------------------------------------------- evaluation
def test_region_raster_evaluation_hand_values(tmp_path: Path):
    ids = np.zeros((4, 6), np.int32)
    ids[:2, :3], ids[:2, 3:], ids[2:, :] = 1, 2, 3
    ids[3, 5] = 0
    pop = np.arange(24, dtype=np.float32).reshape(4, 6)
    m = write_geotiff(tmp_path / "m.tif", pop, transform=T100, crs=CRS)
    ev = evaluate_region_raster({"m": str(m)}, ids, {1: 0 + 1 + 2 + 6 + 7 + 8, 2: 3 + 4 + 5 + 9 + 10 + 11, 3: 1.0},
                                transform=T100, crs=CRS)
    np.testing.assert_allclose(ev.predictions["m"], [24, 42, sum(range(12, 23))])
    assert ev.metrics["m"]["total_true"] == 24 + 42 + 1


def test_region_sums_on_real_tunisian_census(tmp_path: Path):
    """A raster on the grid of the 24 governorate masks holding count / pixels in every pixel of
    each governorate: the region sums of our evaluation must give back the INS counts."""
    if not TUNISIA.exists():
        pytest.skip(f"real Tunisian census not available ({TUNISIA} is absent)")
    from popcorn.prep.census_sources import find_masks, read_masks
    from popcorn.prep.census_tables import read_table

    files = find_masks(str(TUNISIA / "Tunisia_Region_*.tif"))
    table = read_table(TUNISIA / "ins_population.csv", "code_gov", "population", "gov")
    counts = dict(zip(table.frame.source_id, table.frame["count"], strict=True))
    assert len(files) == 24 and sum(counts.values()) == 11_726_178
    labels, grid, pixels, _ = read_masks(files, workers=2, progress=False)  # label k+1 = k-th file
    lab_count = {k + 1: counts[sid] for k, (sid, _) in enumerate(files)}
    per_pixel = np.zeros(len(files) + 1)
    for k, (sid, _) in enumerate(files):
        per_pixel[k + 1] = counts[sid] / pixels[sid]
    m = tmp_path / "gov_density.tif"
    with rasterio.open(m, "w", driver="GTiff", height=grid.height, width=grid.width, count=1, dtype="float32",
                       crs=grid.crs, transform=grid.transform, nodata=None) as dst:
        dst.write(per_pixel[labels].astype(np.float32), 1)
    ev = evaluate_region_raster({"gov": str(m)}, labels, lab_count, transform=grid.transform, crs=grid.crs)
    np.testing.assert_allclose(ev.predictions["gov"], ev.truth, rtol=1e-5)
    assert ev.metrics["gov"]["total_true"] == 11_726_178
    assert ev.metrics["gov"]["total_pred"] == pytest.approx(11_726_178, rel=1e-6)
    assert ev.metrics["gov"]["r2"] == pytest.approx(1.0, abs=1e-9) and ev.missing["gov"] == 0


def test_region_evaluation_resamples_a_finer_map(tmp_path: Path):
    ids = np.array([[1, 1, 2], [0, 2, 2]], np.int32)  # 100 m id raster
    fine = np.ones((4, 6), np.float32)  # 50 m map, 1 person per cell = 4 per 100 m cell
    m = write_geotiff(tmp_path / "fine.tif", fine, transform=from_origin(500000.0, 4000000.0, 50.0, 50.0), crs=CRS)
    ev = evaluate_region_raster({"m": str(m)}, ids, {1: 8.0, 2: 12.0}, transform=T100, crs=CRS)
    np.testing.assert_allclose(ev.predictions["m"], [8.0, 12.0])


# ----------------------------------------------------------------------------- distillation
def test_distillation_student_of_a_popcorn_map(tmp_path: Path):
    """experiments/distill_popvae.yaml on a tiny synthetic world: a POPCORN map made by the POPCORN
    predictor (a random teacher) is the reference of popVAE, trained and mapped by the CLI."""
    import pandas as pd

    from popcorn.cli.popvae import main
    from popcorn.datamodules.pixel import SyntheticPixelDataModule
    from popcorn.datasets.covariates import read_reference
    from popcorn.datasets.synthetic.world import make_synthetic_world
    from popcorn.evaluation.dasymetric import block_sum
    from popcorn.inference.maps import PredictSettings, predict
    from popcorn.tasks import WeakSupervisionTask

    world = make_synthetic_world(tmp_path, size_px=200, seed=3, n_regions=12)
    torch.manual_seed(0)
    teacher = WeakSupervisionTask(occupancy_bias_init=0.5)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, ckpt)
    base = dict(checkpoints=[str(ckpt)], imagery_root=str(world.imagery_dir), seasons=["summer"], tile_size=100,
                overlap=32)
    bag = predict(PredictSettings(**base, write_10m=True), tmp_path / "bag", progress=False).outputs
    with rasterio.open(bag["population_1ha"]) as src:
        map_1ha, t1 = src.read(1), src.transform
    with rasterio.open(world.population_1ha) as src:
        assert t1 == src.transform and src.shape == (20, 20)  # POPCORN's 1 ha grid = the world's 1 ha grid
    # a map of part of the world only: the 100 x 80 px box at rows 60.., cols 40.. = cells 6..15 x 4..11
    part = predict(PredictSettings(**base, bbox=[t1.c + 400, t1.f - 1600, t1.c + 1200, t1.f - 600]),
                   tmp_path / "part", progress=False).outputs["population_1ha"]

    run, student = tmp_path / "run", tmp_path / "student.tif"
    cli = main(["fit", "--config", str(ROOT / "experiments" / "distill_popvae.yaml"),
                f"--data.init_args.root={tmp_path}", "--data.init_args.size_px=200", "--data.init_args.world_seed=3",
                "--data.init_args.n_regions=12", f"--data.init_args.reference={bag['population_1ha']}",
                "--data.init_args.batch_size=32", "--model.latent_dim=16", "--model.lr=3e-3", "--seed_everything=0",
                "--trainer.max_epochs=6", f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false",
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
                f"--map_out={student}", "--tile_size=8"])
    dm = cli.datamodule
    stack = dm.open_stack()
    # the reference is read on the covariate grid: the 1 ha map as is, the 10 m map summed 10 x 10
    assert stack.crs == src.crs and stack.transform == t1 and stack.shape == (20, 20)
    np.testing.assert_array_equal(dm.target, map_1ha)
    with rasterio.open(bag["population_10m"]) as src10:
        from_10m = block_sum(src10.read(1).astype(np.float64))
    np.testing.assert_allclose(read_reference(bag["population_10m"], stack, nodata_to_zero=False), from_10m, rtol=1e-5)
    np.testing.assert_allclose(dm.target, from_10m, rtol=1e-4)
    assert dm.target.std() > 0
    # cells a partial map does not cover (nodata -1) are NaN and never sampled
    ref_part = read_reference(part, stack, nodata_to_zero=False)
    inside = np.zeros((20, 20), bool)
    inside[6:16, 4:12] = True
    assert np.isnan(ref_part[~inside]).all() and np.isfinite(ref_part[inside]).all()
    np.testing.assert_allclose(ref_part[inside], map_1ha[inside], rtol=1e-4)
    dm_part = SyntheticPixelDataModule(root=str(tmp_path), size_px=200, world_seed=3, n_regions=12, reference=str(part),
                                       reference_nodata_to_zero=False)
    dm_part.setup("fit")
    sampled = np.concatenate([dm_part.sampler.train, dm_part.sampler.val, dm_part.sampler.test])
    assert sampled.size > 20 and inside.ravel()[sampled].all()
    # the loss falls
    metrics = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")
    train = metrics.dropna(subset=["train/loss_epoch"])["train/loss_epoch"].to_numpy()
    val = metrics.dropna(subset=["val/loss"])["val/loss"].to_numpy()
    assert len(train) == 6 and train[-1] < 0.5 * train[0] and val[-1] < val[0]
    # the student's map: GeoTIFF on the covariate grid with CRS, transform, nodata, provenance
    with rasterio.open(student) as s:
        assert s.crs == stack.crs and s.transform == t1 and s.shape == (20, 20) and s.nodata == -1.0
        tags, pop = s.tags(), s.read(1)
    assert tags["model"] == "popVAE" and tags["reference"] == bag["population_1ha"].as_posix()
    assert (pop >= 0).all() and pop.max() > 0  # every covariate pixel is valid on the synthetic world
    result = json.loads((Path(cli.trainer.log_dir) / "popvae_metrics.json").read_text())
    assert result["map"] == str(student) and result["pixels_vs_reference"]["total_true"] == pytest.approx(
        float(map_1ha.sum()), rel=1e-4)
    assert result["regions_vs_census"]["total_pred"] == pytest.approx(float(pop.sum()), rel=1e-4)


@pytest.mark.parametrize("name", ["demo_popvae.yaml", "tunisia_popvae.yaml", "distill_popvae.yaml"])
def test_experiment_configs_parse(name):
    import contextlib
    import io

    import yaml

    from popcorn.cli.popvae import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "experiments" / name), "--print_config"])
    assert exc.value.code in (0, None), out.getvalue()
    cfg = yaml.safe_load(out.getvalue())
    assert (cfg["model"]["lr"], cfg["model"]["latent_dim"], cfg["model"]["patch_size"]) == (1e-3, 900, 11)
    assert cfg["early_stopping"]["monitor"] == "val/loss" and cfg["early_stopping"]["patience"] == 5
    assert cfg["data"]["init_args"]["batch_size"] == 64 and cfg["data"]["init_args"]["split"] == [0.7, 0.15, 0.15]
    if name == "tunisia_popvae.yaml":
        assert cfg["data"]["init_args"]["floor_bands"] == [9, 10, 11]
        assert cfg["data"]["init_args"]["floor_weights"] == [0.7, 0.13, 0.17]


def test_two_process_map_equals_one_process(tiny, tmp_path: Path):
    """popVAE maps go through the sharded engine too: 2 gloo processes, the same map bit for bit."""
    from popcorn.inference.distributed import predict_map_distributed

    cov, ref = tiny
    dm = PixelDataModule(covariates=cov, reference=ref)
    dm.setup("fit")
    task = small_task()
    with torch.no_grad():
        task.model.head_out.bias.fill_(2.0)
    stack = CovariateStack(cov)
    one = predict_map(task, stack, dm.normalizer, tmp_path / "one.tif", tile_size=7, batch_size=7)
    two = predict_map_distributed(task, stack, dm.normalizer, tmp_path / "two.tif", devices=2, tile_size=7,
                                  batch_size=7)
    with rasterio.open(one) as a, rasterio.open(two) as b:
        assert np.array_equal(a.read(), b.read())
        assert a.profile == b.profile
