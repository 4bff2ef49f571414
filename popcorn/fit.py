"""``python -m popcorn.fit``: train, validate and test POPCORN with the Lightning CLI.

Examples::

    python -m popcorn.fit --config experiments/demo.yaml            # "fit" is the default
    python -m popcorn.fit fit --config experiments/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    python -m popcorn.fit test --config experiments/demo.yaml --ckpt_path best.ckpt

When ``model.builtup_weights`` is empty, the built-up extractor is first pretrained on the
data module's built-up labels (``builtup_pretraining.*``); its export is cached and reused.
After ``fit`` the best checkpoint is predicted, evaluated at 1 ha and reported
(``<log_dir>/report/``; ``--test_after_fit false`` to skip).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from jsonargparse import lazy_instance
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from popcorn.datamodules import BuiltUpDataModule, CensusDataModule
from popcorn.tasks import BuiltUpTask, WeakSupervisionTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")


@dataclass
class BuiltUpPretraining:
    """Settings of the built-up pretraining run used when no built-up weights are given."""

    max_epochs: int = 10
    """Epochs of BuiltUpTask training."""
    batches_per_epoch: int = 50
    """Random crops per epoch = batches_per_epoch x batch_size."""
    batch_size: int = 8
    patch_size: int = 128
    """Crop side in 10 m pixels."""
    lr: float = 1e-3
    output: str | None = None
    """Where the exported extractor goes; default ``<trainer.default_root_dir>/builtup/builtup_extractor.pt``.
    An existing file is reused; an interrupted run resumes from its last checkpoint."""


class PopcornCLI(LightningCLI):
    """LightningCLI with POPCORN's defaults, built-up pretraining and a test after fitting."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(BuiltUpPretraining, "builtup_pretraining")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, predict, evaluate and report the best checkpoint at the fine level",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": False,
                "checkpoint.filename": "best-{epoch:03d}",
                "trainer.max_epochs": 100,
                "trainer.gradient_clip_val": 0.01,
                "trainer.precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
                "trainer.default_root_dir": "runs",
                "trainer.logger": lazy_instance(CSVLogger, save_dir="runs", name="popcorn"),
            }
        )

    def before_fit(self) -> None:
        model = self.model
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not isinstance(model, WeakSupervisionTask) or model.hparams.builtup_weights or ckpt_path:
            return
        settings = BuiltUpPretraining(**dict(self.config[self.subcommand]["builtup_pretraining"]))
        weights = pretrain_builtup(self.datamodule, settings, self.trainer)
        model.load_builtup_weights(str(weights))

    def after_fit(self) -> None:
        """Predict, evaluate and report the best checkpoint at the fine level.

        The report's table holds the Lightning test stage's three rows (POPCORN, rescaled,
        BuiltUp disaggregation) plus more baselines, so the test stage is not run twice
        (``python -m popcorn.fit test --ckpt_path ...`` runs it on its own).
        """
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        monitored = [cb for cb in self.trainer.checkpoint_callbacks if cb.monitor and cb.best_model_path]
        path = monitored[0].best_model_path if monitored else ""
        if not path and self.trainer.checkpoint_callback is not None:
            path = self.trainer.checkpoint_callback.last_model_path
        dm = self.datamodule
        if not path or not hasattr(dm, "imagery_root"):
            return
        from popcorn.report import predict_evaluate_report

        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        world = Path(dm.imagery_root)
        footprints = world / "builtup_fraction.tif" if (world / "world.json").exists() else None
        predict_evaluate_report(
            [path], dm.imagery_root, log_dir / "report", seasons=list(dm.test_seasons),
            census=dm.census_regions_path, counts=dm.census_counts_path, truth=dm.fine_truth_path,
            buildings=str(footprints) if footprints is not None and footprints.exists() else None,
            id_column=dm.id_column, count_column=dm.count_column,
            units=getattr(dm, "fine_regions_path", None), unit_counts=getattr(dm, "fine_counts_path", None),
            unit_id_column=getattr(dm, "fine_id_column", "region_id"),
            unit_count_column=getattr(dm, "fine_count_column", "count"),
        )


def pretrain_builtup(datamodule: CensusDataModule, settings: BuiltUpPretraining, trainer: Trainer) -> Path:
    """Train the built-up extractor on the data module's built-up labels, or reuse its export."""
    root = Path(trainer.default_root_dir) / "builtup"
    output = Path(settings.output) if settings.output else root / "builtup_extractor.pt"
    if output.exists():
        rank_zero_info(f"using the pretrained built-up extractor {output}")
        return output
    datamodule.prepare_data()
    builtup_data = BuiltUpDataModule.from_census_datamodule(
        datamodule,
        patch_size=settings.patch_size,
        batch_size=settings.batch_size,
        batches_per_epoch=settings.batches_per_epoch,
    )
    task = BuiltUpTask(lr=settings.lr)
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


def last_checkpoint() -> ModelCheckpoint:
    """``last.ckpt``, rewritten after every epoch so an interrupted run resumes where it stopped.

    (Lightning's ``save_last`` only refreshes it when a best checkpoint is written.)
    """
    return ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def main(args: list[str] | None = None) -> PopcornCLI:
    """Entry point; ``fit`` is the default subcommand."""
    os.environ.setdefault("WANDB_MODE", "offline")
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "fit")
    return PopcornCLI(
        WeakSupervisionTask,
        CensusDataModule,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="epoch"), last_checkpoint()]},
    )


if __name__ == "__main__":
    main()
