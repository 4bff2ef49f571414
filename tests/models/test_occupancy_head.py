"""Options of the occupancy head beyond the paper (issue 9, item 4): log-occupancy (``exp``),
window context, the extractor's logit and the pixel's own bands as inputs. Each keeps the
paper's head as default, each runs through the fast predictor and the checkpoint loader
unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from popcorn.errors import PopcornInputError
from popcorn.inference.fast import FastPopcorn, load_popcorn, naive_forward
from popcorn.models import Popcorn
from popcorn.models.popcorn import LOG_OCCUPANCY_CAP, HeadInputs, occupancy_from_head, pixel_bands
from popcorn.models.unet import PAD
from popcorn.tasks import WeakSupervisionTask


def _inputs(h: int = 48, w: int = 56, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s1 = -12 + 4 * torch.randn(1, 2, h, w, generator=g)
    s2 = 400 + 2500 * torch.rand(1, 4, h, w, generator=g)
    return s1, s2


def _perturb(model: Popcorn, seed: int = 1) -> Popcorn:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_defaults_are_the_papers_head() -> None:
    model = Popcorn()
    assert model.occupancy_activation == "relu" and model.occupancy_context_px == ()
    assert not model.head_sees_builtup and not model.head_sees_bands and model.head[0].in_channels == 16
    raw = torch.tensor([-2.0, 0.0, 3.5])
    assert torch.equal(occupancy_from_head(raw), torch.tensor([0.0, 0.0, 3.5]))


def test_exp_head_starts_at_the_prior_and_caps() -> None:
    model = Popcorn(occupancy_activation="exp", occupancy_bias=4.0).eval()
    with torch.no_grad():
        out = model(*_inputs())
    # the last layer starts at zero weight: occupancy is exactly the prior everywhere, so the
    # first map is BuiltUp disaggregation with the census-wide occupancy
    assert torch.allclose(out["occupancy"], torch.full_like(out["occupancy"], 4.0), rtol=1e-6)
    assert torch.allclose(out["population"], 4.0 * out["builtup_score"], rtol=1e-6)
    assert float(model.head_last_layer.bias[0]) == pytest.approx(math.log(4.0))
    big = occupancy_from_head(torch.tensor([100.0]), "exp")
    assert float(big) == pytest.approx(math.exp(LOG_OCCUPANCY_CAP))


def test_context_and_builtup_inputs() -> None:
    feats = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    score = torch.full((2, 1, 5, 5), 0.5)
    spec = HeadInputs((3,), builtup_logit=True)
    x = spec(feats, score)
    assert x.shape == (2, spec.channels(3, 6), 5, 5) == (2, 3 + 4 + 1, 5, 5)
    # window mean at an interior pixel and at the corner (clipped window, as tiles are)
    assert float(x[0, 3, 2, 2]) == pytest.approx(float(feats[0, 0, 1:4, 1:4].mean()))
    assert float(x[0, 3, 0, 0]) == pytest.approx(float(feats[0, 0, 0:2, 0:2].mean()))
    assert torch.allclose(x[:, 6], score[:, 0])  # pooled score
    assert torch.allclose(x[:, 7], torch.zeros(2, 5, 5))  # logit(0.5) = 0
    assert Popcorn(occupancy_context_px=(7, 21), head_sees_builtup=True).head[0].in_channels == 16 + 2 * 17 + 1
    for bad in ((4,), (1,)):
        with pytest.raises(PopcornInputError, match="odd window"):
            Popcorn(occupancy_context_px=bad)
    with pytest.raises(PopcornInputError, match="occupancy_activation"):
        Popcorn(occupancy_activation="softplus")


@pytest.mark.parametrize("options", [
    {"occupancy_activation": "exp"},
    {"occupancy_context_px": (7, 21)},
    {"head_sees_builtup": True, "occupancy_activation": "exp"},
    {"head_sees_bands": True, "head_sees_builtup": True, "occupancy_activation": "exp"},
])
def test_fast_and_naive_forward_agree_with_the_model(options: dict) -> None:
    model = _perturb(Popcorn(occupancy_bias=3.0, **options))
    s1, s2 = _inputs()
    with torch.no_grad():
        ref = model(s1, s2)
        fast_model = FastPopcorn(model, threshold=0.0)
        fast = fast_model(s1, s2)
        naive = naive_forward(model, s1, s2)
    assert fast_model.head_input == model.head_input  # one spec for every forward
    for out in (fast, naive):
        assert torch.allclose(out["population"], ref["population"], atol=1e-4, rtol=1e-4)
    # a tile read with context gives the whole-image values on its core (the engine's promise)
    with torch.no_grad():
        tile = model(s1[..., :40, :40], s2[..., :40, :40])
    assert torch.allclose(tile["population"][..., :8, :8], ref["population"][..., :8, :8], atol=1e-5)
    if any(options.get(k) for k in ("occupancy_context_px", "head_sees_builtup", "head_sees_bands")):
        with pytest.raises(PopcornInputError, match="paper's head only"):
            FastPopcorn(model, backend="kernels")


def test_head_sees_the_pixels_own_bands() -> None:
    """``head_sees_bands``: the head's last inputs are the normalised S1/S2 values of that very
    pixel (not blurred by the U-Net), so changing one pixel's S2 changes that pixel's input and no
    other pixel's."""
    s1, s2 = _inputs(24, 24)
    for modalities, n_bands in (("s1s2", 6), ("s1", 2), ("s2", 4)):
        plain = Popcorn(modalities=modalities).head[0].in_channels
        assert Popcorn(modalities=modalities, head_sees_bands=True).head[0].in_channels == plain + n_bands
    model = Popcorn(head_sees_bands=True).eval()
    prep = model.builtup.prepare(s1, s2)
    bands = pixel_bands(prep)
    assert bands.shape == (1, 6, 24, 24)
    # the value the extractor's normalisation gives, at the right place (after the padding crop)
    assert torch.allclose(bands[:, :2], model.builtup.prepare(s1, None).s1[..., PAD : PAD + 24, PAD : PAD + 24])
    brighter = s2.clone()
    brighter[0, :, 5, 7] += 3000.0
    diff = (pixel_bands(model.builtup.prepare(s1, brighter)) - bands).abs().sum(1)[0]
    assert float(diff[5, 7]) > 1.0 and int((diff > 0).sum()) == 1
    feats = torch.zeros(1, 16, 24, 24)
    x = model.head_input(feats, torch.full((1, 1, 24, 24), 0.5), prep)
    assert x.shape[1] == 16 + 6 and torch.equal(x[:, -6:], bands)
    with pytest.raises(PopcornInputError, match="prepared inputs"):
        model.head_input(feats, torch.full((1, 1, 24, 24), 0.5))


def test_options_survive_a_checkpoint(tmp_path) -> None:
    task = WeakSupervisionTask(occupancy_activation="exp", occupancy_context_px=[7], head_sees_builtup=True,
                               head_sees_bands=True, occupancy_bias_init=2.5)
    _perturb(task.model)
    path = task.export_weights(tmp_path / "w.pt")
    model, meta = load_popcorn(path)
    assert meta["occupancy_activation"] == "exp" and meta["occupancy_context_px"] == [7]
    assert meta["head_sees_builtup"] is True and meta["head_sees_bands"] is True
    s1, s2 = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(s1, s2)["population"], task.model.eval()(s1, s2)["population"], atol=1e-6)
