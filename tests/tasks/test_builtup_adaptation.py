"""The built-up extractor trained as Hafner et al. (2022): labelled source + unlabelled target.

Consistency loss, target batches without labels, source + target steps, per-domain metrics,
export / reload, the adaptation CLI (resumable), the synthetic domain shift, and the demo's
pretraining, which must never open the evaluated world's labels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import yaml
from conftest import make_tiny_world
from paths import PUBLISHED_CHECKPOINT, needs_published

from popcorn.datamodules import BuiltUpDataModule
from popcorn.datasets.synthetic.domain_shift import DomainShift, apply_domain_shift
from popcorn.errors import PopcornInputError
from popcorn.losses import CONSISTENCY_WEIGHT, s1_s2_consistency_loss
from popcorn.models import BuiltUpExtractor
from popcorn.tasks import BuiltUpTask



# ---------------------------------------------------------------------------- consistency loss
def test_consistency_loss_hand_made_case() -> None:
    sar = torch.zeros(1, 1, 1, 2)  # p = (0.5, 0.5)
    opt = torch.tensor([40.0, -40.0]).view(1, 1, 1, 2)  # q = (1, 0)
    # power Jaccard: 1 - sum(pq) / (sum(p^2 + q^2) - sum(pq)) = 1 - 0.5 / (1.5 - 0.5)
    assert float(s1_s2_consistency_loss(sar, opt)) == pytest.approx(0.5, abs=1e-5)
    assert float(s1_s2_consistency_loss(sar, opt, form="mse")) == pytest.approx(0.25, abs=1e-6)
    # agreement costs nothing, whatever the level (the form is scale-free)
    for level in (-1.0, 2.0):
        same = torch.full((2, 1, 3, 3), level)
        assert float(s1_s2_consistency_loss(same, same.clone())) == pytest.approx(0.0, abs=1e-5)
    # the valid mask drops the disagreeing pixel
    valid = torch.tensor([True, False]).view(1, 1, 1, 2)
    p = torch.sigmoid(torch.tensor(40.0))
    expected = 1 - 0.5 * p / (0.25 + p * p - 0.5 * p)
    assert float(s1_s2_consistency_loss(sar, opt, valid)) == pytest.approx(float(expected), abs=1e-5)
    assert CONSISTENCY_WEIGHT == 0.5


def test_consistency_loss_gradients_reach_both_streams() -> None:
    sar = torch.randn(2, 1, 4, 4, requires_grad=True)
    opt = torch.randn(2, 1, 4, 4, requires_grad=True)
    s1_s2_consistency_loss(sar, opt).backward()
    assert sar.grad.abs().sum() > 0 and opt.grad.abs().sum() > 0
    empty = s1_s2_consistency_loss(sar, opt, torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert float(empty) == 0.0
    with pytest.raises(PopcornInputError, match="form"):
        s1_s2_consistency_loss(sar, opt, form="l1")


# ---------------------------------------------------------------------------- data + task
@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A labelled source (tiny world) and a target (a copy whose label file we may poison)."""
    source = make_tiny_world(tmp_path_factory.mktemp("source"))
    target = make_tiny_world(tmp_path_factory.mktemp("target"))
    return source, target


def _dm(source: Path | None, target: Path | None, **kw) -> BuiltUpDataModule:
    args = dict(patch_size=16, batch_size=2, batches_per_epoch=3, val_fraction=0.25, augment=False)
    args.update(kw)
    return BuiltUpDataModule(
        imagery_root=None if source is None else str(source),
        builtup_labels=None if source is None else str(source / "builtup_fraction.tif"),
        target_roots=[] if target is None else [str(target)],
        **args,
    )


def test_target_batches_carry_no_label(worlds: tuple[Path, Path]) -> None:
    source, target = worlds
    dm = _dm(source, target, target_eval_labels=[str(target / "builtup_fraction.tif")])
    dm.setup("fit")
    batches = [b for b, _, _ in dm.train_dataloader()]
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"source", "target"}
        assert "builtup" in batch["source"] and batch["source"]["s1"].shape == (2, 2, 16, 16)
        assert "builtup" not in batch["target"] and batch["target"]["s2"].shape == (2, 4, 16, 16)
    # evaluation labels reach the validation loaders only, tagged by domain
    domains = [next(iter(dl))["domain"] for dl in dm.val_dataloader()]
    assert domains == ["source", "target"]


def test_task_refuses_a_labelled_target_batch(worlds: tuple[Path, Path]) -> None:
    source, target = worlds
    dm = _dm(source, target)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    task = BuiltUpTask()
    task.training_step(batch, 0)  # fine as delivered
    batch["target"]["builtup"] = torch.ones_like(batch["target"]["s1"][:, :1])
    with pytest.raises(PopcornInputError, match="target batch carries a 'builtup' label"):
        task.training_step(batch, 0)


def test_target_labels_have_no_influence(worlds: tuple[Path, Path], tmp_path: Path) -> None:
    """The target loader never reads the label file: a poisoned copy changes no gradient."""
    source, _ = worlds
    target = make_tiny_world(tmp_path / "target")
    grads = []
    for poison in (False, True):
        if poison:  # a would-be label of the target turns into its opposite
            with rasterio.open(target / "builtup_fraction.tif", "r+") as ds:
                ds.write(1.0 - ds.read())
        dm = _dm(source, target)
        dm.setup("fit")
        batch, _, _ = next(iter(dm.train_dataloader()))
        torch.manual_seed(0)
        task = BuiltUpTask()
        task.training_step(batch, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])


def test_source_and_target_step_trains_both_terms(worlds: tuple[Path, Path]) -> None:
    source, target = worlds
    dm = _dm(source, target)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    task = BuiltUpTask()
    logged: dict[str, float] = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    loss = task.training_step(batch, 0)
    loss.backward()
    assert {"train/bce_fused", "train/bce_s1", "train/bce_s2", "train/consistency"} <= set(logged)
    expected = (logged["train/bce_fused"] + logged["train/bce_s1"] + logged["train/bce_s2"]
                + 0.5 * logged["train/consistency"])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    for head in ("sar_out_conv", "optical_out_conv", "fusion_out_conv"):
        assert getattr(task.model, head).conv.weight.grad.abs().sum() > 0, head
    # target only: the consistency term alone still reaches both streams
    task.zero_grad()
    only = task.training_step({"target": batch["target"]}, 0)
    only.backward()
    assert task.model.sar_stream.inc.conv.conv[0].weight.grad.abs().sum() > 0
    assert task.model.optical_stream.inc.conv.conv[0].weight.grad.abs().sum() > 0


def test_bad_builtup_datamodule_arguments(worlds: tuple[Path, Path]) -> None:
    source, target = worlds
    with pytest.raises(PopcornInputError, match="imagery_root and builtup_labels"):
        BuiltUpDataModule(imagery_root=str(source))
    with pytest.raises(PopcornInputError, match="target_roots"):
        BuiltUpDataModule()
    with pytest.raises(PopcornInputError, match="one path"):
        BuiltUpDataModule(target_roots=[str(target)], target_eval_labels=["a", "b"])
    with pytest.raises(PopcornInputError, match="too small"):
        _dm(None, target, patch_size=64).setup()


def test_export_and_reload(tmp_path: Path) -> None:
    torch.manual_seed(3)
    task = BuiltUpTask()
    with torch.no_grad():
        task.model.fusion_out_conv.conv.bias.fill_(0.123)
    path = tmp_path / "extractor.pt"
    task.export_extractor(path)
    assert set(torch.load(path, weights_only=True)) >= {"network"}
    net = BuiltUpExtractor.from_pretrained(path)
    for k, v in task.model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    s1, s2 = torch.randn(1, 2, 20, 20) - 10, torch.rand(1, 4, 20, 20) * 3000
    task.model.eval()
    assert torch.allclose(net(s1, s2), task.model(s1, s2))


def test_weak_supervision_takes_the_export(tmp_path: Path) -> None:
    from popcorn.tasks import WeakSupervisionTask

    torch.manual_seed(4)
    task = BuiltUpTask()
    path = tmp_path / "extractor.pt"
    task.export_extractor(path)
    popcorn = WeakSupervisionTask(builtup_weights=str(path))
    got = popcorn.model.builtup.state_dict() if hasattr(popcorn.model, "builtup") else None
    if got is None:
        pytest.skip("WeakSupervisionTask keeps the extractor under another name")
    assert torch.equal(got["fusion_out_conv.conv.weight"], task.model.fusion_out_conv.conv.weight)


@needs_published
def test_target_only_starts_from_published_weights_with_anchor(worlds: tuple[Path, Path]) -> None:
    _, target = worlds
    task = BuiltUpTask(init_weights=str(PUBLISHED_CHECKPOINT))
    assert task.anchor is not None and not any(p.requires_grad for p in task.anchor.parameters())
    dm = _dm(None, target)
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    logged: dict[str, float] = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    task.train()
    assert not task.anchor.training
    task.training_step(batch, 0).backward()
    assert {"train/consistency", "train/anchor"} <= set(logged)
    params = {id(p) for p in task.configure_optimizers().param_groups[0]["params"]}
    assert not params & {id(p) for p in task.anchor.parameters()}


# ---------------------------------------------------------------------------- CLI, resume
def _adapt_args(tmp_path: Path, source: Path, target: Path, run: str, epochs: int) -> list[str]:
    cfg = {
        "seed_everything": 5,
        "trainer": {"max_epochs": epochs, "default_root_dir": str(tmp_path / run),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / run), "name": "logs",
                                             "version": 0}},
                    "enable_progress_bar": False, "log_every_n_steps": 1,
                    "accelerator": "cpu"},
        "model": {"lr": 0.01},
        "data": {"class_path": "popcorn.datamodules.BuiltUpDataModule",
                 "init_args": {"imagery_root": str(source),
                               "builtup_labels": str(source / "builtup_fraction.tif"),
                               "target_roots": [str(target)],
                               "target_eval_labels": [str(target / "builtup_fraction.tif")],
                               "patch_size": 16, "batch_size": 2, "batches_per_epoch": 3,
                               "val_fraction": 0.25}},
    }
    (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(cfg))
    return ["--config", str(tmp_path / f"{run}.yaml")]


def test_adaptation_cli_resumes_to_the_same_weights(worlds: tuple[Path, Path], tmp_path: Path) -> None:
    from popcorn.cli.adapt_builtup import main

    source, target = worlds
    main(_adapt_args(tmp_path, source, target, "straight", epochs=2))
    main(_adapt_args(tmp_path, source, target, "resumed", epochs=1))
    first = tmp_path / "resumed" / "builtup_extractor.pt"
    assert first.exists() and (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()
    main(_adapt_args(tmp_path, source, target, "resumed", epochs=2))  # picks up last.ckpt
    a = torch.load(tmp_path / "straight" / "builtup_extractor.pt", weights_only=True)["network"]
    b = torch.load(tmp_path / "resumed" / "builtup_extractor.pt", weights_only=True)["network"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert BuiltUpExtractor.from_pretrained(tmp_path / "resumed" / "builtup_extractor.pt") is not None
    metrics = pd.read_csv(tmp_path / "straight" / "logs" / "version_0" / "metrics.csv")
    for key in ("val/source/iou", "val/source/f1", "val/source/precision", "val/source/recall",
                "val/target/iou", "val/target/f1", "val/target/precision", "val/target/recall"):
        assert key in metrics and metrics[key].notna().any(), key


# ---------------------------------------------------------------------------- domain shift
def test_domain_shift_changes_the_look_and_keeps_gaps() -> None:
    rng = np.random.default_rng(0)
    h = w = 16
    s2 = np.full((4, h, w), 1000.0, np.float32)
    s2[3] = 3000.0  # vegetation: NIR >> red
    s2[:, 0, 0] = np.nan
    s1 = np.full((2, h, w), -12.0, np.float32)
    s1[:, 1, 1] = np.nan
    f = np.zeros((h, w), np.float32)
    f[8:, 8:] = 1.0  # roofs
    same2, same1 = apply_domain_shift(s2, s1, f, DomainShift(), rng)
    np.testing.assert_array_equal(same2, s2)
    np.testing.assert_array_equal(same1, s1)
    shift = DomainShift(roof_brightness=0.5, vegetation_greenness=0.5, s1_offset_db=-2.0)
    out2, out1 = apply_domain_shift(s2, s1, f, shift, rng)
    assert np.isnan(out2[:, 0, 0]).all() and np.isnan(out1[:, 1, 1]).all()
    assert out2[0, 12, 12] == pytest.approx(500.0)  # roof blue halved
    veg_ratio = out2[3, 2, 2] / out2[2, 2, 2]
    assert veg_ratio == pytest.approx(3.0 ** 0.5, rel=1e-4)  # log NIR/red contrast halved
    assert out1[0, 2, 2] == pytest.approx(-14.0)
    assert s2[0, 12, 12] == 1000.0  # inputs untouched
    noisy2, _ = apply_domain_shift(s2, s1, f, DomainShift(noise=0.1), np.random.default_rng(1))
    assert np.nanstd(noisy2[0]) > 10
    assert DomainShift.preset("other_continent").name == "other_continent"
    assert DomainShift(noise=0.2).name.startswith("custom-")
    with pytest.raises(PopcornInputError, match="preset"):
        DomainShift.preset("mars")
    with pytest.raises(PopcornInputError, match="roof_tint"):
        DomainShift(roof_tint=(1.0, 1.0))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shifted_world_differs_and_default_world_is_unchanged(tmp_path: Path) -> None:
    from popcorn.datasets.synthetic.world import make_synthetic_world, world_dir

    plain = make_synthetic_world(tmp_path, size_px=100, seed=0, n_regions=5)
    shifted = make_synthetic_world(tmp_path, size_px=100, seed=0, n_regions=5,
                                   domain_shift="other_continent")
    assert plain.directory == world_dir(tmp_path, 100, 0) == tmp_path / "world_100px_seed0"
    assert shifted.directory == tmp_path / "world_100px_seed0_shift-other_continent"
    assert shifted.metadata()["domain_shift"]["name"] == "other_continent"
    assert "domain_shift" not in plain.metadata()
    # same truth, other imagery
    with rasterio.open(plain.builtup_fraction) as a, rasterio.open(shifted.builtup_fraction) as b:
        assert np.array_equal(a.read(), b.read())
    with rasterio.open(plain.s2_path("summer")) as a, rasterio.open(shifted.s2_path("summer")) as b:
        x, y = a.read().astype(float), b.read().astype(float)
        assert a.tags().get("domain_shift") is None and b.tags()["domain_shift"] == "other_continent"
    assert np.array_equal(x == 0, y == 0)  # the same cloud gaps
    assert np.abs(x - y).mean() > 50
    # no shift = the same files as a world made without the argument
    again = make_synthetic_world(tmp_path / "again", size_px=100, seed=0, n_regions=5, domain_shift=None)
    for p in plain.files():
        if p.suffix == ".tif" or p.suffix == ".csv":
            assert _sha(p) == _sha(again.directory / p.name), p.name


# ---------------------------------------------------------------------------- demo pretraining
def test_demo_pretraining_never_opens_the_evaluated_worlds_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source world (other seed, shifted) with labels + the evaluated world's imagery only."""
    import builtins

    from lightning.pytorch import Trainer

    from popcorn.datamodules import SyntheticCensusDataModule
    from popcorn.tasks.pretraining import BuiltUpPretraining, pretrain_builtup

    dm = SyntheticCensusDataModule(root=str(tmp_path / "worlds"), size_px=200, seed=0, n_regions=8)
    dm.prepare_data()
    truth = {Path(p).resolve() for p in (dm.builtup_labels_path, dm.fine_truth_path)}
    truth |= {dm.world_directory.resolve() / n for n in ("population_10m.tif", "land_cover.tif")}
    opened: list[Path] = []
    real_rio_open, real_open = rasterio.open, builtins.open

    def spy(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)):
            opened.append(Path(fp).resolve())
        return real_rio_open(fp, *args, **kwargs)

    def spy_builtin(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(rasterio, "open", spy)
    monkeypatch.setattr(builtins, "open", spy_builtin)
    settings = BuiltUpPretraining(
        max_epochs=1, batches_per_epoch=2, batch_size=2, patch_size=64,
        source_world_seed=1, source_world_size_px=200, source_domain_shift="other_continent",
    )
    out = pretrain_builtup(dm, settings, Trainer(default_root_dir=tmp_path / "run", logger=False))
    monkeypatch.undo()
    assert out.exists()
    source_labels = tmp_path / "worlds" / "world_200px_seed1_shift-other_continent" / "builtup_fraction.tif"
    assert source_labels.resolve() in opened  # the spy sees label reads
    assert any(p.parent == dm.world_directory.resolve() and p.name.startswith("S2_") for p in opened)
    assert not truth & set(opened), sorted(truth & set(opened))
