"""``popcorn popvae``: train popVAE on covariates + a reference raster, predict the map,
evaluate it against the census (Lightning CLI).

Examples::

    popcorn popvae --config experiments/demo_popvae.yaml          # fit (default), test, map, metrics
    popcorn popvae --config experiments/tunisia_popvae.yaml --data.init_args.covariates='[a.tif,b.tif]'
    popcorn popvae --config experiments/distill_popvae.yaml
    popcorn popvae test --config experiments/demo_popvae.yaml --ckpt_path best.ckpt
    popcorn popvae --config experiments/demo_popvae.yaml --print_config

``popcorn.fit`` cannot host this task: its CLI fixes the model class to ``WeakSupervisionTask``.

After ``fit`` (unless ``--predict_after_fit false``): the best checkpoint is tested on the held-out
pixels, the full map is predicted through the tiled, resumable engine of ``popcorn.inference.maps``
(the one POPCORN's maps use; ``<log_dir>/popvae_population.tif``, or ``--map_out``) and
evaluated: region sums vs census counts (R^2, MAE, RMSE) and pixel R^2 against the reference
(and against the fine truth when the data module has one, e.g. the synthetic world). Metrics go to
``<log_dir>/popvae_metrics.json`` and ``popvae_metrics.md``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from popcorn.datamodules.pixel import PixelDataModule
from popcorn.datasets.covariates import Normalizer
from popcorn.inference.popvae import DEFAULT_TILE
from popcorn.tasks.pixel_regression import PixelRegressionTask

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class PopVAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--predict_after_fit", type=bool, default=True,
                            help="after fit: test the best checkpoint, predict the full map and evaluate it")
        parser.add_argument("--map_out", type=str | None, default=None,
                            help="predicted map (default <log_dir>/popvae_population.tif)")
        parser.add_argument("--tile_size", type=int, default=DEFAULT_TILE,
                            help="tile side (covariate pixels) of the map prediction")
        parser.add_argument("--predict_batch_size", type=int, default=4096, help="patches per prediction batch")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.filename": "best-{epoch:03d}",
            "early_stopping.monitor": "val/loss", "early_stopping.mode": "min", "early_stopping.patience": 5,
            "trainer.max_epochs": 100,
            "trainer.default_root_dir": "runs/popvae",
        })

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("predict_after_fit", True) or self.trainer.interrupted:
            return
        cfg = self.config[self.subcommand]
        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        if not self.trainer.is_global_zero:
            return
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        run_map_and_metrics(self.model, self.datamodule, Path(cfg.get("map_out") or log_dir / "popvae_population.tif"),
                            log_dir, cfg.get("tile_size", DEFAULT_TILE), cfg.get("predict_batch_size", 4096),
                            checkpoint=best, test_metrics={k: float(v) for k, v in self.trainer.callback_metrics.items()
                                                           if k.startswith("test/")})


def run_map_and_metrics(task: PixelRegressionTask, dm: PixelDataModule, out: Path, log_dir: Path,
                        tile_size: int = DEFAULT_TILE,
                        batch_size: int = 4096, checkpoint: str = "", test_metrics: dict | None = None) -> dict:
    """Predict the full map with ``task`` on ``dm``'s covariates and evaluate it; print and store."""
    from popcorn.evaluation.compare import format_comparison
    from popcorn.inference.popvae import evaluate_map, predict_map

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    norm = Normalizer.from_dict(task.hparams.normalization)
    path = predict_map(task, dm.open_stack(), norm, out, tile_size=tile_size, batch_size=batch_size,
                       tags={"checkpoint": str(checkpoint), "reference": str(dm.reference)})
    t_pred = time.perf_counter() - t0
    ev = evaluate_map(path, reference=dm.reference, census_regions=dm.census_regions, census_counts=dm.census_counts,
                      region_ids=dm.region_ids, id_column=dm.id_column, count_column=dm.count_column,
                      region_res=dm.region_res)
    truth = getattr(dm, "fine_truth", None)
    ev_truth = evaluate_map(path, reference=truth)["pixels"] if truth else None
    lines = [f"popVAE map: {path} (predicted in {t_pred:.1f} s)", ""]
    result: dict = {"map": str(path), "checkpoint": str(checkpoint), "predict_seconds": t_pred,
                    "test_pixels": test_metrics or {}}
    for key, e, title in (("pixels_vs_reference", ev["pixels"], "Pixels vs the reference raster"),
                          ("pixels_vs_truth", ev_truth, "Pixels vs the fine truth"),
                          ("regions_vs_census", ev["regions"], "Census regions (sums vs counts)")):
        if e is not None:
            result[key] = e.metrics["popVAE"]
            lines += [format_comparison(e, f"### {title}"), ""]
    text = "\n".join(lines)
    print(text)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "popvae_metrics.md").write_text(text + "\n")
    (log_dir / "popvae_metrics.json").write_text(json.dumps(result, indent=2))
    torch.set_grad_enabled(True)
    return result


def main(args: list[str] | None = None) -> PopVAECLI:
    from_command_line = args is None
    argv = list(sys.argv[1:] if from_command_line else args)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "fit")
    if from_command_line:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    return PopVAECLI(PixelRegressionTask, PixelDataModule, subclass_mode_data=True,
                     args=None if from_command_line else argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
