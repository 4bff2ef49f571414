"""popcorn.inference.fast / popcorn.inference.cpu_kernels: the optimised forward equals the naive one (1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import popcorn.inference.cpu_build as cpu_build
import popcorn.inference.fast as inference
from popcorn.errors import PopcornInputError
from popcorn.inference.cpu_build import load_kernels
from popcorn.inference.fast import FastPopcorn, naive_forward
from popcorn.models import Popcorn

TOL = 1e-4

pytestmark = pytest.mark.skipif(load_kernels() is None, reason="no C++ compiler: CPU kernels unavailable")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Textured S1/S2-like rasters (blocks of bright "roofs" on vegetation) with a NaN gap."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    town = (((yy // 3) % 4 != 3) & ((xx // 3) % 4 != 3) & (yy < h * 2 // 3)).float()
    s1 = torch.stack([-14 + 12 * town, -20 + 8 * town])[None].repeat(b, 1, 1, 1)
    s1 = s1 + torch.randn(b, 2, h, w, generator=g)
    veg = torch.tensor([400.0, 700.0, 500.0, 3000.0]).view(1, 4, 1, 1)
    roof = torch.tensor([1200.0, 1400.0, 1600.0, 1900.0]).view(1, 4, 1, 1)
    s2 = veg + (roof - veg) * town + 150 * torch.randn(b, 4, h, w, generator=g)
    s2[0, :, h // 2 : h // 2 + 3, 1:4] = float("nan")
    s1[0, 1, 2:4, w // 2] = float("nan")
    return s1, s2


def _model(seed: int, modalities: str = "s1s2", split: bool = True) -> Popcorn:
    """A POPCORN with random weights that behaves like a trained one: built-up scores spread over
    (0, 1), occupancy varied and zero on part of the pixels, ReLUs off and on in every layer."""
    torch.manual_seed(seed)
    m = Popcorn(occupancy_init="scratch", modalities=modalities, occupancy_split=split)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
            elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod.kernel_size != (1, 1):
                mod.weight.mul_(2.5)  # keep the activations from fading through the U-Net
                if isinstance(mod, nn.ConvTranspose2d):
                    mod.bias.uniform_(-0.5, 0.5)
        head = [c for c in m.head if isinstance(c, nn.Conv2d)]
        for conv in head:
            conv.weight.mul_(1.5)
        m.eval()
        s1, s2 = _inputs(1, 40, 40, seed=99)
        prep = m.occupancy.prepare(s1 if m.use_s1 else None, s2 if m.use_s2 else None)
        feats = torch.cat([f for f in m.occupancy.stream_features(prep) if f is not None], dim=1)
        raw = m.head(feats)[:, 0]
        head[-1].bias[0] -= raw.median() - 0.1 * raw.std()  # occupancy > 0 on about half the pixels
        scale = 1.0 / float(raw.std())  # occupancy of a few people per pixel, as in trained models
        head[-1].weight.mul_(scale)
        head[-1].bias.mul_(scale)
    return m


def _compare(model: Popcorn, s1: torch.Tensor, s2: torch.Tensor, threshold: float = 0.0) -> dict[str, torch.Tensor]:
    fast = FastPopcorn(model, threshold, backend="kernels")
    assert fast.backend == "kernels"
    with torch.no_grad():
        ref = naive_forward(model, s1, s2)
        got = fast(s1, s2)
    for key in ("population", "builtup_score"):
        assert got[key].shape == ref[key].shape
        assert float((got[key] - ref[key]).abs().max()) <= TOL, key
    return {"ref_" + k: v for k, v in ref.items()} | got


@pytest.mark.parametrize("shape", [(1, 8, 9), (1, 15, 16), (2, 37, 45), (1, 64, 64), (1, 61, 130)])
def test_kernels_equal_naive_dense(shape: tuple[int, int, int]) -> None:
    model = _model(1)
    out = _compare(model, *_inputs(*shape))
    assert float((out["occupancy"] - out["ref_occupancy"]).abs().max()) <= TOL
    occ = out["ref_occupancy"]
    assert float(occ.std()) > 0.01 and bool((occ == 0).any()) and bool((occ > 0).any())  # a non-trivial test


@pytest.mark.parametrize(("modalities", "split"), [("s1", True), ("s2", True), ("s1s2", False)])
def test_kernels_equal_naive_variants(modalities: str, split: bool) -> None:
    out = _compare(_model(2, modalities, split), *_inputs(1, 41, 53))
    assert float((out["occupancy"] - out["ref_occupancy"]).abs().max()) <= TOL


def test_kernels_equal_torch_backend_on_trained_like_scale() -> None:
    """The torch fallback and the kernels agree as well (both against the naive forward)."""
    model = _model(3)
    s1, s2 = _inputs(1, 50, 70, seed=4)
    with torch.no_grad():
        ref = naive_forward(model, s1, s2)
        a = FastPopcorn(model, 0.0, backend="torch")(s1, s2)
        b = FastPopcorn(model, 0.0, backend="kernels")(s1, s2)
    for key in ("population", "builtup_score", "occupancy"):
        assert float((a[key] - ref[key]).abs().max()) <= TOL
        assert float((b[key] - a[key]).abs().max()) <= TOL


def test_sparse_head_partial_and_empty_tiles() -> None:
    model = _model(5)
    s1, s2 = _inputs(1, 48, 66)
    with torch.no_grad():
        ref = naive_forward(model, s1, s2)
    bu = ref["builtup_score"]
    threshold = float(bu.flatten().kthvalue(bu.numel() // 2).values)  # about half the pixels are skipped
    for backend in ("kernels", "torch"):
        with torch.no_grad():
            got = FastPopcorn(model, threshold, backend=backend)(s1, s2)
        active = got["builtup_score"] > threshold  # its own scores decide (they equal bu within 1e-6)
        assert 0 < int(active.sum()) < bu.numel()
        assert bool(torch.isnan(got["occupancy"][~active]).all())
        assert bool((got["population"][~active] == 0).all())
        assert float((got["occupancy"][active] - ref["occupancy"][active]).abs().max()) <= TOL
        assert float((got["population"] - ref["population"]).abs().max()) <= threshold * float(ref["occupancy"].max()) + TOL
        # a tile whose built-up scores are all below the threshold: no occupancy at all
        with torch.no_grad():
            empty = FastPopcorn(model, 1.0, backend=backend)(s1, s2)
        assert bool((empty["population"] == 0).all()) and bool(torch.isnan(empty["occupancy"]).all())
        assert float((empty["builtup_score"] - bu).abs().max()) <= TOL


def test_workspace_reuse_and_threads_do_not_change_results() -> None:
    """Buffers are reused across tiles of one size and shared across sizes; rows are split across threads."""
    model = _model(6)
    fast = FastPopcorn(model, 0.0, backend="kernels")
    big, small = _inputs(1, 70, 90, seed=1), _inputs(1, 45, 39, seed=2)
    with torch.no_grad():
        first = fast(*big)
        fast(*small)
        fast(*_inputs(1, 58, 77, seed=3))
        again = fast(*big)
        torch.set_num_threads(2)
        threaded = fast(*big)
    for key in ("population", "builtup_score"):
        assert torch.equal(first[key], again[key])
        assert float((threaded[key] - first[key]).abs().max()) <= 1e-6


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(7)
    assert FastPopcorn(model, backend="torch").backend == "torch"
    with pytest.raises(PopcornInputError, match="backend"):
        FastPopcorn(model, backend="gpu")
    monkeypatch.setattr(inference, "load_kernels", lambda: None)
    assert FastPopcorn(model).backend == "torch"  # falls back silently
    with pytest.raises(PopcornInputError, match="unavailable"):
        FastPopcorn(model, backend="kernels")


def test_kernels_unavailable_without_compiler_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_build, "_state", {})  # forget the loaded library for this test
    monkeypatch.setenv("POPCORN_CPU_KERNELS", "0")
    assert cpu_build.load_kernels() is None
    monkeypatch.delenv("POPCORN_CPU_KERNELS")
    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    assert cpu_build.load_kernels() is None


def test_kernels_reject_bad_inputs() -> None:
    fast = FastPopcorn(_model(8), backend="kernels")
    s1, s2 = _inputs(1, 30, 30)
    with pytest.raises(PopcornInputError):
        fast(s1[:, :1], s2)
    with pytest.raises(PopcornInputError):
        fast(s1, s2[:, :, :20])
    with pytest.raises(PopcornInputError):
        fast(None, s2)


def test_naive_forward_matches_popcorn_forward() -> None:
    model = _model(9)
    s1, s2 = _inputs(1, 33, 35)
    with torch.no_grad():
        a, b = naive_forward(model, s1, s2), model(s1, s2)
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=TOL)


def test_block_sparse_occupancy_equals_whole_tile() -> None:
    """Texture in one corner only: the occupancy branch runs on a few blocks (+ halo), same numbers."""
    model = _model(11)
    s1, s2 = _inputs(1, 330, 301, seed=5)
    veg1, veg2 = torch.tensor([-15.0, -21.0]).view(1, 2, 1, 1), torch.tensor([400.0, 700.0, 500.0, 3000.0]).view(1, 4, 1, 1)
    for region in ((..., slice(60, None), slice(None)), (..., slice(None), slice(70, None))):
        s1[region] = veg1.expand_as(s1[region])  # uniform vegetation away from the corner
        s2[region] = veg2.expand_as(s2[region])
    with torch.no_grad():
        ref = naive_forward(model, s1, s2)
    bu = ref["builtup_score"][0, 0]
    threshold = float(bu[100:, 100:].max())  # active: the corner and a few pixels at the raster edges
    fast = FastPopcorn(model, threshold, backend="kernels")
    assert fast.engine is not None
    runs = fast.engine._sparse_runs(bu > threshold, 14, 14, 330 + 28, 301 + 28)
    assert runs is not None and len(runs) >= 2  # the block-sparse path is taken
    with torch.no_grad():
        got = fast(s1, s2)
    active = got["builtup_score"] > threshold
    assert 0 < int(active.sum()) < active.numel() // 20
    assert float((got["occupancy"][active] - ref["occupancy"][active]).abs().max()) <= TOL
    assert bool(torch.isnan(got["occupancy"][~active]).all()) and bool((got["population"][~active] == 0).all())
    assert float((got["population"] - ref["population"]).abs().max()) <= threshold * float(ref["occupancy"].max()) + TOL


def test_full_fp32_turns_tf32_off_and_restores_the_flags() -> None:
    """GPU maps must equal the CPU ones within 1e-4: TF32 (cuDNN's default for fp32 convolutions)
    put them 8e-3 apart on an H200 (benchmarks/bench_gpu.py), so the predictor runs in full fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with inference.full_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), inference.full_fp32():
            raise RuntimeError("a failing tile")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
