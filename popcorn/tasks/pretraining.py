"""Built-up pretraining as a callback of the POPCORN fit: when the task has no built-up weights,
train (or reuse) an extractor before the first epoch.

Without a source the extractor learns from the data module's own built-up labels; with one
(``source_world_seed`` / ``source_imagery``) it learns as Hafner et al. (2022): BCE on the
source's labels plus the S1/S2 consistency loss on the data module's imagery as unlabelled
target, whose labels are then never read. The export is cached and reused; an interrupted
pretraining resumes from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from popcorn.datamodules import BuiltUpDataModule, CensusDataModule
from popcorn.errors import PopcornInputError
from popcorn.tasks.builtup import BuiltUpTask

__all__ = ["BuiltUpPretraining", "PretrainBuiltUp", "pretrain_builtup"]


@dataclass
class BuiltUpPretraining:
    """Settings of the built-up pretraining run used when no built-up weights are given.

    Without a source (``source_world_seed`` / ``source_imagery``), the extractor learns from the
    data module's own built-up labels. With one, it learns as Hafner et al. (2022): BCE on the
    source's labels plus the S1/S2 consistency loss on the data module's imagery as unlabelled
    target (``adapt``), whose labels are then never read.
    """

    max_epochs: int = 10
    """Epochs of BuiltUpTask training."""
    batches_per_epoch: int = 50
    """Random crops per epoch = batches_per_epoch x batch_size (source; as many target batches)."""
    batch_size: int = 8
    """Source patches per batch."""
    target_batch_size: int | None = None
    """Unlabelled target patches per batch; default batch_size."""
    patch_size: int = 128
    """Crop side in 10 m pixels."""
    lr: float = 1e-3
    consistency_weight: float = 0.5
    """Weight of the S1/S2 consistency loss on the target (0.5 as Hafner et al.)."""
    source_world_seed: int | None = None
    """Labelled source = the synthetic world of this seed (generated under the data module's
    ``root``, default data/synthetic), instead of the data module's own labels."""
    source_world_size_px: int = 600
    source_domain_shift: str | None = "other_continent"
    """Look of the source world (a preset of popcorn.datasets.synthetic.domain_shift; null = default)."""
    source_imagery: str | None = None
    """Labelled source = this imagery folder (with ``source_labels``, a built-up fraction raster)."""
    source_labels: str | None = None
    adapt: bool = True
    """With a source: adapt to the data module's imagery (unlabelled target, consistency loss)."""
    output: str | None = None
    """Where the exported extractor goes; default ``<trainer.default_root_dir>/builtup/builtup_extractor.pt``.
    An existing file is reused; an interrupted run resumes from its last checkpoint."""


class PretrainBuiltUp(Callback):
    """Before the first epoch of a fresh fit of a task without built-up weights (``model.
    builtup_weights`` empty), pretrain the extractor (:func:`pretrain_builtup`) and load it, so
    that the task's occupancy prior is estimated with it. Nothing on resume (the checkpoint holds
    the extractor) or when weights were given.

    Under DDP the pretraining cannot run inside the job (its own trainer would wait on the other
    processes), so ``popcorn fit`` calls :meth:`before_launch` before ``trainer.fit`` (with one
    process too, so that the random draws do not depend on the number of processes): rank 0
    pretrains, the others wait for its export, and every process loads it. Used alone (a plain
    ``Trainer``), the callback pretrains and loads in ``on_fit_start``.
    """

    def __init__(self, settings: BuiltUpPretraining | None = None, wait_seconds: float = 24 * 3600) -> None:
        self.settings = settings or BuiltUpPretraining()
        self.wait_seconds = wait_seconds
        self.loaded = False  # True once before_launch has loaded the export into the task

    @staticmethod
    def needed(pl_module: LightningModule, ckpt_path: str | None) -> bool:
        hparams = getattr(pl_module, "hparams", {})
        return "builtup_weights" in hparams and not hparams["builtup_weights"] and not ckpt_path

    def before_launch(self, trainer: Trainer, pl_module: LightningModule, datamodule: CensusDataModule,
                      ckpt_path: str | None) -> None:
        """Before ``trainer.fit`` (and before the processes of a multi-process fit connect): rank 0
        pretrains, the others wait for its export, every process loads it into the task."""
        if not self.needed(pl_module, ckpt_path):
            return
        output = export_path(self.settings, trainer)
        if rank_zero_only.rank == 0:
            pretrain_builtup(datamodule, self.settings, trainer)
        deadline = time.monotonic() + self.wait_seconds
        while not output.exists():
            if time.monotonic() > deadline:
                raise PopcornInputError(
                    f"rank {rank_zero_only.rank}: no built-up export {output} from rank 0 after "
                    f"{self.wait_seconds:.0f} s; pretrain first or give model.builtup_weights"
                )
            time.sleep(2.0)
        # loaded now, before the data module's set-up draws its shuffle seed: building the extractor
        # draws random numbers, so loading it after the set-up would change the training order
        pl_module.load_builtup_weights(str(output))
        self.loaded = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loaded or not self.needed(pl_module, trainer.ckpt_path):
            return
        if trainer.world_size > 1 and not export_path(self.settings, trainer).exists():
            raise PopcornInputError(
                "built-up pretraining cannot run inside a multi-process fit: run `popcorn fit` (which "
                "pretrains before the processes start) or give model.builtup_weights"
            )
        weights = pretrain_builtup(trainer.datamodule, self.settings, trainer)
        pl_module.load_builtup_weights(str(weights))

    def __repr__(self) -> str:
        return f"PretrainBuiltUp({asdict(self.settings)})"


def export_path(settings: BuiltUpPretraining, trainer: Trainer) -> Path:
    """Where the pretrained extractor is exported (``settings.output`` or under the run root)."""
    if settings.output:
        return Path(settings.output)
    return Path(trainer.default_root_dir) / "builtup" / "builtup_extractor.pt"


def _builtup_source(datamodule: CensusDataModule, settings: BuiltUpPretraining) -> tuple[str, str] | None:
    """(imagery folder, built-up labels) of the labelled source, None = the data module's own."""
    if settings.source_imagery is not None or settings.source_labels is not None:
        if settings.source_imagery is None or settings.source_labels is None:
            raise PopcornInputError(
                "builtup_pretraining: give both source_imagery and source_labels (or neither)"
            )
        return settings.source_imagery, settings.source_labels
    if settings.source_world_seed is None:
        return None
    from popcorn.datasets.synthetic.world import make_synthetic_world, world_dir

    root = getattr(datamodule, "root", "data/synthetic")
    size, seed = settings.source_world_size_px, settings.source_world_seed
    shift = settings.source_domain_shift
    directory = world_dir(root, size, seed, shift)
    if directory == Path(datamodule.imagery_root):
        raise PopcornInputError(
            f"builtup_pretraining: the source world {directory} is the data module's own world; "
            "pick another source_world_seed or domain shift"
        )
    if not (directory / "world.json").exists():
        make_synthetic_world(root, size_px=size, seed=seed, n_regions=20, domain_shift=shift)
    return str(directory), str(directory / "builtup_fraction.tif")


def pretrain_builtup(datamodule: CensusDataModule, settings: BuiltUpPretraining, trainer: Trainer) -> Path:
    """Train the built-up extractor (see :class:`BuiltUpPretraining`), or reuse its export."""
    root = Path(trainer.default_root_dir) / "builtup"
    output = export_path(settings, trainer)
    if output.exists():
        rank_zero_info(f"using the pretrained built-up extractor {output}")
        return output
    datamodule.prepare_data()
    sizes = dict(
        patch_size=settings.patch_size,
        batch_size=settings.batch_size,
        target_batch_size=settings.target_batch_size,
        batches_per_epoch=settings.batches_per_epoch,
    )
    source = _builtup_source(datamodule, settings)
    if source is None:  # the data module's own labels
        builtup_data = BuiltUpDataModule.from_census_datamodule(datamodule, **sizes)
    elif settings.adapt:  # labelled source + the data module's imagery, no labels
        builtup_data = BuiltUpDataModule.from_census_datamodule(
            datamodule, adapt_to_imagery=True, imagery_root=source[0], builtup_labels=source[1], **sizes
        )
    else:
        builtup_data = BuiltUpDataModule(source[0], source[1], seasons=datamodule.seasons, **sizes)
    task = BuiltUpTask(lr=settings.lr, consistency_weight=settings.consistency_weight)
    checkpoints = root / "checkpoints"
    last = checkpoints / "last.ckpt"
    pretrainer = Trainer(
        max_epochs=settings.max_epochs,
        default_root_dir=root,
        logger=CSVLogger(root, name="logs"),
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0)],
        accelerator="cuda" if torch.cuda.is_available() else "cpu",
        devices=1,
        precision=trainer.precision,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, settings.batches_per_epoch // 2)),
        check_val_every_n_epoch=settings.max_epochs,  # the export is the last epoch's weights
        num_sanity_val_steps=0,
    )
    rank_zero_info(f"pretraining the built-up extractor for {settings.max_epochs} epochs -> {output}")
    pretrainer.fit(task, datamodule=builtup_data, ckpt_path=str(last) if last.exists() else None)
    task.export_extractor(output)
    return output
