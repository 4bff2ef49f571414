"""popVAE: a variational autoencoder over the covariate context of a pixel plus a regression head.

Nasralli et al., *Fine-Scale Population Estimation Using a Variational Autoencoder-Based
Approach* (IJCNN 2025); facts in ``shared/reference/popvae-method.md``. Our own PyTorch code.

Inputs: a context ``patch`` (B, bands, P, P) of normalised covariates centred on the target pixel
(P = 11 by default) and the target pixel's own band vector (B, bands) (default: the patch centre).

- Encoder: Conv3x3(16) ReLU -> residual block -> flatten -> Dense(32) ReLU -> z_mean, z_log_var
  (900). The residual block is the reference's (IssaNasralli/popVAE,
  ``popVAE_model/popVAE_full.py``, ``residual_block``): a branch Conv3x3(32) ReLU -> Conv3x3(32)
  ReLU, projected back to the input's 16 channels by a 1x1 convolution (no activation), added to
  the input, *no* ReLU after the add; it keeps the input's 16 channels, so the flatten has
  16 * P * P values. ``residual="projected_shortcut"`` is the block of this module before it
  followed the reference (branch [Conv3x3(32) ReLU -> Conv3x3(32)] plus a 1x1 projection of the
  *input* to 32 channels, ReLU after the add; 32 * P * P values): kept only so that checkpoints
  trained with it load and predict unchanged (:class:`popcorn.tasks.PixelRegressionTask` picks it
  for checkpoints saved without the ``residual`` hyper-parameter).
- Reparameterisation: z = mu + exp(logvar / 2) * eps in training; z = mu in eval mode unless
  ``sample_in_eval`` (so predicted maps are deterministic and tile-independent).
- Decoder: Dense(32) ReLU -> Dense(P*P*32) ReLU -> reshape (32, P, P) -> ConvT3x3(32) ReLU ->
  ConvT3x3(16) ReLU -> ConvT3x3(bands) sigmoid = reconstructed patch in [0, 1].
- Head: concat(pixel vector, z) as a 1x1 map -> Conv(16) ReLU -> Conv(8) ReLU -> global average
  pool -> Dense(1) softplus = predicted log1p(population per pixel).

All convolutions use "same" padding, so the spatial size stays P. On a 1x1 map a 3x3 "same"
convolution only ever sees its centre weights, so the head uses 1x1 convolutions (equivalent,
fewer dead parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PopVAE", "ResidualBlock", "ProjectedShortcutBlock", "RESIDUAL_STYLES", "kl_divergence",
           "LOG_CLIP_MAX"]

LOG_CLIP_MAX = 6.125
"""Upper clip of predictions in log1p space before expm1 (paper; about 456 people per cell)."""


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the latent dimensions, averaged over samples.

    ``-0.5 * sum_d (1 + logvar - mu^2 - exp(logvar))``; mu = 0, logvar = 0 gives 0, and mu = 1,
    logvar = 0 gives 0.5 per latent dimension.
    """
    per_sample = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    return per_sample.mean()


RESIDUAL_STYLES = ("reference", "projected_shortcut")


class ResidualBlock(nn.Module):
    """popVAE's residual block, as the reference: ``x + proj(relu(conv2(relu(conv1(x)))))``.

    ``conv1``/``conv2`` are 3x3 "same" convolutions with ``width`` filters, each followed by a
    ReLU; ``proj`` is a 1x1 convolution back to the input's ``channels`` (an identity when
    ``width == channels``, as the reference adds no projection then). Nothing follows the add,
    so the output can be negative and the block is the identity when ``proj`` is zero.
    Output channels = ``channels``.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.out_channels = channels
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.proj = nn.Conv2d(width, channels, 1) if width != channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        branch = F.relu(self.conv2(F.relu(self.conv1(x))))
        return x + self.proj(branch)


class ProjectedShortcutBlock(nn.Module):
    """The block this module used before following the reference:
    ``relu(conv2(relu(conv1(x))) + proj(x))`` with ``proj`` a 1x1 convolution of the *input* to
    ``width`` channels. Output channels = ``width``. Kept only to load older checkpoints."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.out_channels = width
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.proj = nn.Conv2d(channels, width, 1) if channels != width else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.proj(x))


class PopVAE(nn.Module):
    """popVAE ("full" variant). Paper values are the defaults.

    Args:
        in_bands: covariate bands (after preprocessing, e.g. 10 for the Tunisian stack).
        patch_size: context side P in pixels (odd).
        latent_dim: size of z.
        conv_width: filters of the first encoder conv (and the second decoder ConvT).
        res_width: filters of the residual block's branch (and of the decoder's reshaped map /
            first ConvT, 32 in the reference).
        dense_width: the encoder's and decoder's Dense layer.
        head_widths: filters of the two head convolutions.
        sample_in_eval: draw z in eval mode too (the Keras original always samples).
        residual: ``"reference"`` (default: :class:`ResidualBlock`) or ``"projected_shortcut"``
            (:class:`ProjectedShortcutBlock`, for checkpoints trained before the change).
    """

    def __init__(
        self,
        in_bands: int,
        patch_size: int = 11,
        latent_dim: int = 900,
        conv_width: int = 16,
        res_width: int = 32,
        dense_width: int = 32,
        head_widths: tuple[int, int] = (16, 8),
        sample_in_eval: bool = False,
        residual: str = "reference",
    ) -> None:
        super().__init__()
        if residual not in RESIDUAL_STYLES:
            raise ValueError(f"residual must be one of {RESIDUAL_STYLES}, got {residual!r}")
        if in_bands < 1:
            raise ValueError(f"in_bands must be >= 1, got {in_bands}")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd (the target pixel is the centre), got {patch_size}")
        self.in_bands, self.patch_size, self.latent_dim = in_bands, patch_size, latent_dim
        self.res_width = res_width
        self.sample_in_eval = sample_in_eval
        p2 = patch_size * patch_size
        # encoder
        self.enc_conv = nn.Conv2d(in_bands, conv_width, 3, padding=1)
        block = ResidualBlock if residual == "reference" else ProjectedShortcutBlock
        self.residual = residual
        self.enc_res = block(conv_width, res_width)
        self.enc_dense = nn.Linear(self.enc_res.out_channels * p2, dense_width)
        self.z_mean = nn.Linear(dense_width, latent_dim)
        self.z_log_var = nn.Linear(dense_width, latent_dim)
        # decoder
        self.dec_dense1 = nn.Linear(latent_dim, dense_width)
        self.dec_dense2 = nn.Linear(dense_width, res_width * p2)
        self.dec_conv1 = nn.ConvTranspose2d(res_width, res_width, 3, padding=1)
        self.dec_conv2 = nn.ConvTranspose2d(res_width, conv_width, 3, padding=1)
        self.dec_out = nn.ConvTranspose2d(conv_width, in_bands, 3, padding=1)
        # prediction head
        h1, h2 = head_widths
        self.head_conv1 = nn.Conv2d(in_bands + latent_dim, h1, 1)
        self.head_conv2 = nn.Conv2d(h1, h2, 1)
        self.head_out = nn.Linear(h2, 1)

    # ------------------------------------------------------------------ parts
    def encode(self, patch: Tensor) -> tuple[Tensor, Tensor]:
        """(B, bands, P, P) -> z_mean, z_log_var (B, latent_dim)."""
        self._check(patch)
        h = F.relu(self.enc_conv(patch))
        h = self.enc_res(h)
        h = F.relu(self.enc_dense(h.flatten(1)))
        return self.z_mean(h), self.z_log_var(h)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        if self.training or self.sample_in_eval:
            return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        return mu

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> reconstructed patch (B, bands, P, P) in [0, 1]."""
        h = F.relu(self.dec_dense1(z))
        h = F.relu(self.dec_dense2(h))
        h = h.view(-1, self.res_width, self.patch_size, self.patch_size)
        h = F.relu(self.dec_conv1(h))
        h = F.relu(self.dec_conv2(h))
        return torch.sigmoid(self.dec_out(h))

    def head(self, pixel: Tensor, z: Tensor) -> Tensor:
        """Predicted log1p(population) (B,) from the pixel vector (B, bands) and z (B, latent)."""
        h = torch.cat([pixel, z], dim=1)[:, :, None, None]
        h = F.relu(self.head_conv1(h))
        h = F.relu(self.head_conv2(h))
        h = h.mean(dim=(2, 3))
        return F.softplus(self.head_out(h)).squeeze(1)

    def forward(self, patch: Tensor, pixel: Tensor | None = None, reconstruct: bool = True) -> dict[str, Tensor]:
        """Returns ``pred`` (B,) log1p(population), ``recon`` (B, bands, P, P) (if ``reconstruct``),
        ``mu``, ``logvar``, ``z`` (B, latent_dim)."""
        if pixel is None:
            c = self.patch_size // 2
            pixel = patch[:, :, c, c]
        mu, logvar = self.encode(patch)
        z = self.reparameterize(mu, logvar)
        out = {"pred": self.head(pixel, z), "mu": mu, "logvar": logvar, "z": z}
        if reconstruct:
            out["recon"] = self.decode(z)
        return out

    @torch.no_grad()
    def predict_log(self, patch: Tensor, pixel: Tensor | None = None) -> Tensor:
        """Prediction only (no decoder), clipped to [0, LOG_CLIP_MAX] in log1p space."""
        return self.forward(patch, pixel, reconstruct=False)["pred"].clamp(0.0, LOG_CLIP_MAX)

    def _check(self, patch: Tensor) -> None:
        if patch.ndim != 4 or patch.shape[1] != self.in_bands or patch.shape[2:] != (self.patch_size,) * 2:
            raise ValueError(
                f"PopVAE expects patches of shape (B, {self.in_bands}, {self.patch_size}, {self.patch_size}), "
                f"got {tuple(patch.shape)}"
            )
