"""``python -m popcorn.fit``: train, validate and test POPCORN with the Lightning CLI.

Examples::

    python -m popcorn.fit --config experiments/demo.yaml            # "fit" is the default
    python -m popcorn.fit fit --config experiments/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    python -m popcorn.fit test --config experiments/demo.yaml --ckpt_path best.ckpt

When ``model.builtup_weights`` is empty, the built-up extractor is first pretrained
(``builtup_pretraining.*``): on the data module's built-up labels, or, with a labelled source
(``source_world_seed`` / ``source_imagery``), on the source's labels while adapting to the data
module's imagery without its labels (Hafner et al. 2022); its export is cached and reused.
Protocol (the paper's, default): train on every census region and keep the last epoch;
``--data.init_args.val_fraction=0.1 --checkpoint.monitor=val/loss`` holds regions out and keeps
the best validation checkpoint instead. After ``fit`` that checkpoint is predicted, evaluated at 1 ha and reported
(``<log_dir>/report/``; ``--test_after_fit false`` to skip).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from popcorn.datamodules import BuiltUpDataModule, CensusDataModule
from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.tasks import BuiltUpTask, WeakSupervisionTask
from popcorn.tasks.callbacks import MapReport, RandomState

SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


class PopcornCLI(LightningCLI):
    """LightningCLI with POPCORN's defaults, built-up pretraining and a report after fitting
    (:class:`popcorn.tasks.callbacks.MapReport`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(BuiltUpPretraining, "builtup_pretraining")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, predict, evaluate and report the best checkpoint at the fine level",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                # The paper's protocol: train on every census region and keep the last epoch
                # (last.ckpt). --checkpoint.monitor=val/loss (with data.val_fraction > 0) keeps
                # the best validation checkpoint instead.
                "checkpoint.monitor": None,
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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, without the selection checkpoint when nothing is monitored.

        With ``checkpoint.monitor: null`` (the paper's protocol) the model is the last epoch's,
        which ``last.ckpt`` (written every epoch) already holds; a second unmonitored
        ModelCheckpoint would clash with it.
        """
        monitor = self._get(self.config, "checkpoint.monitor", default=None)
        if monitor is None:
            parser = self._parser(self.subcommand)
            callbacks = [self._get(self.config_init, key) for key in parser.callback_keys
                         if key != "checkpoint"]
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            trainer = self._instantiate_trainer(trainer_config, callbacks)
        else:
            trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit" and self._get(self.config, "test_after_fit", default=True):
            trainer.callbacks.append(MapReport())  # predict, evaluate and report after fit
        return trainer

    def before_instantiate_classes(self) -> None:
        """Resuming (``--ckpt_path .../version_N/checkpoints/last.ckpt``) continues in the same run
        folder: the CSV logger gets version N instead of a new one."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = config.get("ckpt_path") if config is not None else None
        if not ckpt or Path(ckpt).parent.name != "checkpoints" or not Path(ckpt).parent.parent.name.startswith("version_"):
            return
        version = Path(ckpt).parent.parent.name
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
            if init is not None and "CSVLogger" in str(getattr(logger, "class_path", "")) and init.get("version") is None:
                init.version = version

    def before_fit(self) -> None:
        model = self.model
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not isinstance(model, WeakSupervisionTask) or model.hparams.builtup_weights or ckpt_path:
            return
        settings = BuiltUpPretraining(**dict(self.config[self.subcommand]["builtup_pretraining"]))
        weights = pretrain_builtup(self.datamodule, settings, self.trainer)
        model.load_builtup_weights(str(weights))


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
    output = Path(settings.output) if settings.output else root / "builtup_extractor.pt"
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


def last_checkpoint() -> ModelCheckpoint:
    """``last.ckpt``, rewritten after every epoch so an interrupted run resumes where it stopped.

    (Lightning's ``save_last`` only refreshes it when a best checkpoint is written.)
    """
    return ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def cli_arguments(args: list[str] | None, subcommands: tuple[str, ...]) -> list[str]:
    """Command-line arguments with ``fit`` as the default subcommand (W&B offline by default) and
    every ``--config`` expanded into its ``base:`` configs first (:func:`expand_config`)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or (argv[0] not in subcommands and argv[0] not in ("-h", "--help")):
        argv.insert(0, "fit")
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [x for path in expand_config(argv[i + 1]) for x in ("--config", path)]
            i += 2
            continue
        if arg.startswith("--config="):
            out += [x for path in expand_config(arg.split("=", 1)[1]) for x in ("--config", path)]
        else:
            out.append(arg)
        i += 1
    return out


def expand_config(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """A config file -> the files to pass as ``--config``, bases first, in order.

    A config may start with ``base: [other.yaml, ...]`` (paths relative to it): those are read
    first, recursively, and the config itself last, so its keys override theirs (LightningCLI
    merges successive ``--config`` files). A config with a ``base`` key is passed as a copy
    without that key; one without is passed unchanged.
    """
    import tempfile

    import yaml

    file = Path(path)
    if not file.is_file():
        return [path]  # LightningCLI reports the missing file itself
    key = str(file.resolve())
    if key in _seen:
        raise PopcornInputError(f"config {path}: its base configs include it again ({' -> '.join(_seen)})")
    content = yaml.safe_load(file.read_text())
    if not isinstance(content, dict) or "base" not in content:
        return [path]
    bases = content.pop("base")
    bases = [bases] if isinstance(bases, str) else list(bases or [])
    expanded: list[str] = []
    for base in bases:
        base_path = file.parent / str(base)
        if not base_path.is_file():
            raise PopcornInputError(f"config {path}: base config {base_path} does not exist")
        expanded += expand_config(str(base_path), (*_seen, key))
    copy = Path(tempfile.mkdtemp(prefix="popcorn-config-")) / file.name
    copy.write_text(yaml.safe_dump(content, sort_keys=False))
    return [*expanded, str(copy)]


def main(args: list[str] | None = None) -> PopcornCLI:
    """Entry point; ``fit`` is the default subcommand."""
    argv = cli_arguments(args, SUBCOMMANDS)
    return PopcornCLI(
        WeakSupervisionTask,
        CensusDataModule,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [LearningRateMonitor(logging_interval="epoch"), last_checkpoint(), RandomState()]},
    )


if __name__ == "__main__":
    try:
        main()
    except PopcornInputError as err:
        exit_with_error(err)
