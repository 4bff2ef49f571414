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
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from popcorn.datamodules import CensusDataModule
from popcorn.errors import PopcornInputError, exit_with_error
from popcorn.tasks import WeakSupervisionTask
from popcorn.tasks.callbacks import MapReport, RandomState
from popcorn.tasks.pretraining import BuiltUpPretraining, PretrainBuiltUp

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class PopcornCLI(LightningCLI):
    """LightningCLI with POPCORN's defaults and two callbacks on ``fit``: built-up pretraining when
    no weights are given (:class:`popcorn.tasks.pretraining.PretrainBuiltUp`, settings
    ``builtup_pretraining.*``) and a report after fitting (:class:`popcorn.tasks.callbacks.MapReport`)."""

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
                # the region sampler shards itself under DDP (CensusDataModule._shard)
                "trainer.use_distributed_sampler": False,
                # fp32 on GPUs too: on an H200, bf16-mixed trained the demo 2.5x slower than fp32
                # (small 8/16-channel convolutions on variable region crops; benchmarks/bench_gpu.py)
                "trainer.precision": "32-true",
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
        if self.subcommand == "fit":  # built-up weights first when none are given, then train
            settings = BuiltUpPretraining(**dict(self._get(self.config, "builtup_pretraining", default={}) or {}))
            trainer.callbacks.insert(0, PretrainBuiltUp(settings))
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
        """The built-up extractor is pretrained now, before ``trainer.fit`` (see
        :meth:`PretrainBuiltUp.before_launch`): a multi-process fit must, since its own trainer
        would wait on the other processes; a single-process fit does too, so that pretraining
        draws the same random numbers (right after seeding) with one process or many."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        for callback in self.trainer.callbacks:
            if isinstance(callback, PretrainBuiltUp):
                callback.before_launch(self.trainer, self.model, self.datamodule, ckpt_path)


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
    without that key; one without is passed unchanged. The copy's folder is removed when the
    process exits (LightningCLI reads it while parsing; the run saves its merged config itself).
    """
    import atexit
    import shutil
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
    folder = tempfile.mkdtemp(prefix="popcorn-config-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copy = Path(folder) / file.name
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
