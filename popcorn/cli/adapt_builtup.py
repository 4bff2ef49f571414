"""``popcorn adapt-builtup``: train or adapt the built-up extractor (Lightning CLI).

Adapt the published weights to a region's imagery, no labels (S1/S2 consistency, Hafner et al.
2022), and export the result for ``python -m popcorn.fit --model.builtup_weights=...``::

    popcorn adapt-builtup --config experiments/builtup/adapt_published.yaml \\
        --data.target_roots='[data/uga/imagery]' --output=runs/builtup/uga/builtup_extractor.pt

Labelled source + unlabelled target (the demo's worlds)::

    popcorn adapt-builtup --config experiments/builtup/demo.yaml

``fit`` is the default subcommand; ``validate`` scores given weights (``--model.init_weights``)
on the data module's labelled areas. Checkpoints go to ``<trainer.default_root_dir>/checkpoints``;
running the same command again resumes from its ``last.ckpt`` (``--resume false`` starts over).
The export (published layout, ``{"network": state_dict}``) is written when fit ends.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from popcorn.datamodules.builtup import BuiltUpDataModule
from popcorn.fit import cli_arguments, last_checkpoint
from popcorn.tasks.builtup import BuiltUpTask

SUBCOMMANDS = ("fit", "validate")


class AdaptBuiltUpCLI(LightningCLI):
    """LightningCLI for :class:`BuiltUpTask`: fixed checkpoint folder, auto-resume, export."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output", type=str | None, default=None,
            help="exported extractor ({'network': state_dict}); default "
                 "<trainer.default_root_dir>/builtup_extractor.pt",
        )
        parser.add_argument(
            "--resume", type=bool, default=True,
            help="continue from <trainer.default_root_dir>/checkpoints/last.ckpt when it exists",
        )
        parser.add_argument(
            "--validate_before_fit", type=bool, default=True,
            help="score the starting weights on the labelled areas first (not when resuming)",
        )
        parser.set_defaults({
            "trainer.max_epochs": 10,
            "trainer.default_root_dir": "runs/builtup",
            "trainer.num_sanity_val_steps": 0,
            "trainer.logger": lazy_instance(CSVLogger, save_dir="runs/builtup", name="logs"),
        })

    def _root(self) -> Path:
        return Path(self.trainer.default_root_dir)

    #: The export's default file name (in ``trainer.default_root_dir``) and what it holds.
    export_name, exported = "builtup_extractor.pt", "built-up extractor"

    def output_path(self) -> Path:
        output = self.config[self.subcommand].get("output")
        return Path(output) if output else self._root() / self.export_name

    def export(self, output: Path) -> None:
        """Write the trained weights to ``output`` (after fit, rank 0)."""
        self.model.export_extractor(output)

    def before_fit(self) -> None:
        checkpoints = self._root() / "checkpoints"
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(checkpoints)  # fixed place, so the same command finds last.ckpt
        cfg = self.config_init[self.subcommand]
        last = checkpoints / "last.ckpt"
        resuming = cfg.get("ckpt_path") is not None
        if not resuming and self.config[self.subcommand].get("resume", True) and last.exists():
            rank_zero_info(f"resuming from {last}")
            cfg["ckpt_path"] = str(last)
            resuming = True
        if not resuming and self.config[self.subcommand].get("validate_before_fit", True):
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=True)

    def after_fit(self) -> None:
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        output = self.output_path()
        self.export(output)
        rank_zero_info(f"{self.exported} exported to {output}")


def main(args: list[str] | None = None) -> AdaptBuiltUpCLI:
    """Entry point; ``fit`` is the default subcommand."""
    argv = cli_arguments(args, SUBCOMMANDS)
    return AdaptBuiltUpCLI(
        BuiltUpTask,
        BuiltUpDataModule,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [last_checkpoint()]},  # folder set in before_fit
    )


if __name__ == "__main__":
    main()
