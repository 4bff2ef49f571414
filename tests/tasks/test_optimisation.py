"""WeakSupervisionTask's optimisation as the paper has it (issue 11): Adam groups (no weight decay
on exactly the last head layer, decay on every other trainable parameter, the frozen built-up
extractor left out), StepLR stepping once per epoch with gamma, and gradient-norm clipping at
0.01 being on in ``popcorn.fit``'s defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from popcorn.datamodules import CensusDataModule
from popcorn.tasks import WeakSupervisionTask


def _datamodule(root: Path, **kw) -> CensusDataModule:
    return CensusDataModule(
        imagery_root=str(root), census_regions=str(root / "census_regions.gpkg"),
        census_counts=str(root / "census_counts.csv"), **kw,
    )


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(param) -> its param group; fails if a parameter is in two groups."""
    seen: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter is in two optimiser groups"
            seen[id(p)] = group
    return seen


@pytest.mark.parametrize("modalities", ["s1s2", "s2"])
def test_optimiser_groups(modalities: str) -> None:
    torch.manual_seed(0)
    task = WeakSupervisionTask(occupancy_bias_init=0.5, weight_decay=1e-5, modalities=modalities)
    optimizer = task.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adam)
    groups = _groups_by_param(optimizer)
    model = task.model
    last = {id(p) for p in model.head_last_layer.parameters()}
    assert len(last) == 2  # weight and bias of the 1x1 conv 64 -> 2
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    # exactly the trainable parameters are optimised ...
    assert set(groups) == trainable
    # ... and the frozen built-up extractor is not among them
    builtup = {id(p) for p in model.builtup.parameters()}
    assert builtup and not builtup & set(groups)
    assert not any(p.requires_grad for p in model.builtup.parameters())
    if modalities == "s2":  # the unused SAR stream of the occupancy branch is frozen too
        assert not {id(p) for p in model.occupancy.sar_stream.parameters()} & set(groups)
    # no weight decay on exactly the last head layer; decay on every other one
    no_decay = {pid for pid, g in groups.items() if g["weight_decay"] == 0.0}
    assert no_decay == last
    assert all(g["weight_decay"] == 1e-5 for pid, g in groups.items() if pid not in last)
    assert len(trainable - last) > 10  # the occupancy U-Net and the first head layers

    # behaviour, not bookkeeping: with zero gradients, one Adam step moves only decayed weights
    before = {id(p): p.detach().clone() for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {id(p) for p in model.parameters() if p.requires_grad and not torch.equal(p, before[id(p)])}
    assert not moved & last
    head_first = {id(p) for p in model.head[0].parameters()}
    assert head_first <= moved  # the first head layer is decayed towards zero


class _LrPerEpoch(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: WeakSupervisionTask) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_steplr_steps_once_per_epoch_with_gamma(tiny_world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = WeakSupervisionTask(occupancy_bias_init=0.5, lr=1e-3, lr_step_size=2, lr_gamma=0.5)
    record = _LrPerEpoch()
    trainer = Trainer(
        max_epochs=5, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[record],
    )
    trainer.fit(task, datamodule=_datamodule(tiny_world, augment=False, shuffle_seed=0))
    # two batches per epoch, yet the rate changes every lr_step_size = 2 *epochs*
    expected = [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    assert len(record.lrs) == 5
    for epoch, (lrs, lr) in enumerate(zip(record.lrs, expected, strict=True)):
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-9), f"epoch {epoch}: {lrs}"
    # after the fifth epoch the scheduler has stepped five times: 1e-3 * 0.5 ** (5 // 2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2.5e-4)


class _ClipRecordingTask(WeakSupervisionTask):
    """Records the gradient norm of the optimised parameters before and after Lightning's
    clipping (``configure_gradient_clipping`` is where Lightning clips)."""

    norms: list[tuple[float, float]]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):  # noqa: ANN001
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        before = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        after = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if not hasattr(self, "norms"):
            self.norms = []
        self.norms.append((before, after))


def test_gradient_clipping_is_on_by_default(tiny_world: Path, tmp_path: Path) -> None:
    from popcorn.fit import PopcornCLI

    root = tmp_path / "run"
    cli = PopcornCLI(
        _ClipRecordingTask, CensusDataModule, subclass_mode_data=True, run=False,
        args=[
            "--data=CensusDataModule", f"--data.imagery_root={tiny_world}",
            f"--data.census_regions={tiny_world / 'census_regions.gpkg'}",
            f"--data.census_counts={tiny_world / 'census_counts.csv'}", "--data.augment=false",
            "--model.occupancy_bias_init=0.5", "--model.lr=1e-3",
            f"--trainer.default_root_dir={root}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
        ],
    )
    # the CLI's defaults (nothing above sets them): clip the gradient norm at 0.01, as the paper
    assert cli.trainer.gradient_clip_val == 0.01
    assert cli.trainer.gradient_clip_algorithm in (None, "norm")  # Lightning's default is the norm
    assert cli.parser.get_defaults()["trainer"]["gradient_clip_val"] == 0.01
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    norms = cli.model.norms
    assert len(norms) == 3
    # at most 0.01 after clipping; a gradient above 0.01 is scaled to exactly 0.01 (the norm,
    # not the values, is clipped) and there was one (else this test would prove nothing)
    assert any(before > 0.01 for before, _ in norms), norms
    for before, after in norms:
        assert after <= 0.01 * (1 + 1e-4), norms
        assert after == pytest.approx(min(before, 0.01), rel=1e-3), norms
