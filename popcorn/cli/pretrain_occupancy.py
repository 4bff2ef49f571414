"""``popcorn pretrain-occupancy``: learn the occupancy branch from a source's fine population.

Beyond the paper (see :mod:`popcorn.tasks.occupancy_pretraining`). Train on labelled source
areas, then start ``popcorn fit`` from the export; the target's census trains it as usual::

    popcorn pretrain-occupancy --config experiments/occupancy/pretrain.yaml \\
        --data.imagery_roots='[data/source/imagery]' --data.population_rasters='[data/source/population_10m.tif]' \\
        --model.builtup_weights=PATH_OR_URL --output=runs/occupancy/occupancy_weights.pt
    python -m popcorn.fit --config experiments/uga.yaml --model.occupancy_weights=runs/occupancy/occupancy_weights.pt

The head options (``--model.occupancy_activation``, ``--model.head_sees_builtup`` ...) must be
those of the fit. Checkpoints go to ``<trainer.default_root_dir>/checkpoints``; the same command
resumes from its ``last.ckpt`` (``--resume false`` starts over); the export is written at the end.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger

from popcorn.cli.adapt_builtup import AdaptBuiltUpCLI
from popcorn.datamodules.population import PopulationDataModule
from popcorn.fit import cli_arguments, last_checkpoint
from popcorn.tasks.occupancy_pretraining import OccupancyPretrainingTask

SUBCOMMANDS = ("fit",)


class PretrainOccupancyCLI(AdaptBuiltUpCLI):
    """:class:`AdaptBuiltUpCLI`'s checkpoint folder and resume, exporting the occupancy branch."""

    export_name, exported = "occupancy_weights.pt", "occupancy branch"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.set_defaults({
            "validate_before_fit": False,  # no validation data: the census fit is the evaluation
            "trainer.max_epochs": 8,
            "trainer.default_root_dir": "runs/occupancy",
            "trainer.logger": lazy_instance(CSVLogger, save_dir="runs/occupancy", name="logs"),
        })

    export_name, exported = "occupancy_weights.pt", "occupancy branch"

    def export(self, output: Path) -> None:
        self.model.export_occupancy(output)

def main(args: list[str] | None = None) -> PretrainOccupancyCLI:
    """Entry point; ``fit`` is the only subcommand."""
    return PretrainOccupancyCLI(
        OccupancyPretrainingTask,
        PopulationDataModule,
        args=cli_arguments(args, SUBCOMMANDS),
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [last_checkpoint()], "limit_val_batches": 0},
    )


if __name__ == "__main__":
    main()
