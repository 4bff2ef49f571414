"""Lightning tasks: how each model is trained, validated and tested."""

from popcorn.tasks.builtup import BuiltUpTask
from popcorn.tasks.pixel_regression import PixelRegressionTask
from popcorn.tasks.weak_supervision import WeakSupervisionTask

__all__ = ["BuiltUpTask", "PixelRegressionTask", "WeakSupervisionTask"]
