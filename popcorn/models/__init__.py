"""Networks: dual-stream U-Net, pretrained built-up extractor, the POPCORN model and popVAE."""

from popcorn.models.builtup import PUBLISHED_SHA256, PUBLISHED_URL, BuiltUpExtractor
from popcorn.models.popcorn import Popcorn, load_occupancy_export
from popcorn.models.popvae import PopVAE
from popcorn.models.unet import DualStreamUNet

__all__ = ["PUBLISHED_SHA256", "PUBLISHED_URL", "BuiltUpExtractor", "DualStreamUNet", "Popcorn", "PopVAE", "load_occupancy_export"]
