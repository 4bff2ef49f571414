"""Lightning tasks: how each model is trained, validated and tested."""

from popcorn.tasks.builtup import BuiltUpTask
from popcorn.tasks.occupancy_pretraining import OccupancyPretrainingTask
from popcorn.tasks.pixel_regression import PixelRegressionTask
from popcorn.tasks.weak_supervision import WeakSupervisionTask

__all__ = ["BuiltUpTask", "OccupancyPretrainingTask", "PixelRegressionTask", "WeakSupervisionTask"]
