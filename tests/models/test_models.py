"""Tests of popcorn.models: checkpoint loading, numerics vs. a functional re-implementation, Popcorn."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from paths import PUBLISHED_CHECKPOINT

import popcorn.models.builtup as builtup_mod
from popcorn.errors import PopcornInputError
from popcorn.models import PUBLISHED_SHA256, PUBLISHED_URL, BuiltUpExtractor, DualStreamUNet, Popcorn

# the shared data sit beside the project root (../shared), as in the other test files
SHARED_CKPT = PUBLISHED_CHECKPOINT
PUBLISHED_NAME = PUBLISHED_URL.rsplit("/", 1)[-1]
needs_ckpt = pytest.mark.skipif(
    not SHARED_CKPT.is_file(), reason=f"published checkpoint not available at {SHARED_CKPT}"
)

# Constants typed in again from docs (reference/popcorn-method.md), not imported from the code.
S1_MEAN, S1_STD = [-11.4260, -17.7530], [5.5983, 5.0076]
S2_MEAN = [1383.4556, 1468.2986, 1460.4567, 2226.6821]
S2_STD = [1053.3217, 1129.0261, 1130.7949, 1724.3213]


# ---------------------------------------------------------------------------------------------
# helpers
def raw_network(path: Path = SHARED_CKPT) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)["network"]
    return {k: v for k, v in sd.items() if not k.startswith("disc.")}


def random_net(seed: int = 0) -> BuiltUpExtractor:
    """Random weights with non-trivial BN running statistics (so eval-mode BN is exercised)."""
    torch.manual_seed(seed)
    net = BuiltUpExtractor()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net.eval()


def realistic(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s1 = torch.tensor([-11.0, -18.0]).view(1, 2, 1, 1) + 4 * torch.randn(b, 2, h, w, generator=g)
    s2 = torch.tensor([1200.0, 1300.0, 1300.0, 2400.0]).view(1, 4, 1, 1) * (
        0.4 + 1.2 * torch.rand(b, 4, h, w, generator=g)
    )
    return s1, s2


def scene(kind: str, h: int = 96, w: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Vegetation, a textured town (3 px roofs, streets every 12 px) or a flat 'urban colour'."""
    g = torch.Generator().manual_seed(seed)
    veg_s2 = torch.tensor([300.0, 600.0, 400.0, 3000.0]).view(1, 4, 1, 1) + 50 * torch.randn(1, 4, h, w, generator=g)
    veg_s1 = torch.tensor([-11.0, -18.0]).view(1, 2, 1, 1) + torch.randn(1, 2, h, w, generator=g)
    if kind == "vegetation":
        return veg_s1, veg_s2
    if kind == "flat":
        return veg_s1, torch.tensor([1500.0, 1500.0, 1500.0, 1600.0]).view(1, 4, 1, 1).expand(1, 4, h, w).clone()
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    street = ((yy % 12) < 2) | ((xx % 12) < 2)
    blocks = torch.rand(1, 1, h // 3 + 1, w // 3 + 1, generator=g)
    roof = blocks.repeat_interleave(3, 2).repeat_interleave(3, 3)[..., :h, :w]
    s2 = (1100 + 800 * roof).expand(1, 4, h, w) + 60 * torch.randn(1, 4, h, w, generator=g)
    s2[:, :, street] = torch.tensor([900.0, 1000.0, 1050.0, 1300.0])[:, None]
    s1 = torch.tensor([-2.0, -9.0]).view(1, 2, 1, 1) + 3 * torch.randn(1, 2, h, w, generator=g)
    s1[:, :, street] = torch.tensor([-8.0, -15.0])[:, None]
    return s1, s2


# Independent functional re-implementation, straight from the method description.
def _double_conv(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    for conv, bn in (("0", "1"), ("3", "4")):
        x = F.conv2d(x, sd[f"{p}.{conv}.weight"], sd[f"{p}.{conv}.bias"], padding=1)
        x = F.batch_norm(
            x, sd[f"{p}.{bn}.running_mean"], sd[f"{p}.{bn}.running_var"], sd[f"{p}.{bn}.weight"],
            sd[f"{p}.{bn}.bias"], training=False, eps=1e-5,
        )
        x = F.relu(x)
    return x


def _up(x: torch.Tensor, skip: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    x = F.conv_transpose2d(x, sd[f"{p}.up.weight"], sd[f"{p}.up.bias"], stride=2)
    dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
    x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
    return _double_conv(torch.cat([skip, x], 1), sd, f"{p}.conv.conv")


def _stream(x: torch.Tensor, sd: dict[str, torch.Tensor], s: str) -> torch.Tensor:
    x1 = _double_conv(x, sd, f"{s}.inc.conv.conv")
    x2 = _double_conv(F.max_pool2d(x1, 2), sd, f"{s}.down_seq.down1.mpconv.1.conv")
    x3 = _double_conv(F.max_pool2d(x2, 2), sd, f"{s}.down_seq.down2.mpconv.1.conv")
    return _up(_up(x3, x2, sd, f"{s}.up_seq.up2"), x1, sd, f"{s}.up_seq.up1")


def reference_builtup(sd: dict[str, torch.Tensor], s1: torch.Tensor | None, s2: torch.Tensor | None) -> torch.Tensor:
    feats = []
    for x, mean, std, s in ((s1, S1_MEAN, S1_STD, "sar_stream"), (s2, S2_MEAN, S2_STD, "optical_stream")):
        if x is None:
            feats.append(None)
            continue
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        x = F.pad(x, [14, 14, 14, 14], mode="reflect")
        feats.append(_stream(x, sd, s)[:, :, 14:-14, 14:-14])
    f1, f2 = feats
    if f1 is not None and f2 is not None:
        logit = F.conv2d(torch.cat([f1, f2], 1), sd["fusion_out_conv.conv.weight"], sd["fusion_out_conv.conv.bias"])
    elif f1 is not None:
        logit = F.conv2d(f1, sd["sar_out_conv.conv.weight"], sd["sar_out_conv.conv.bias"])
    else:
        logit = F.conv2d(f2, sd["optical_out_conv.conv.weight"], sd["optical_out_conv.conv.bias"])
    return torch.sigmoid(logit)


@pytest.fixture(scope="module")
def published() -> BuiltUpExtractor:
    if not SHARED_CKPT.is_file():
        pytest.skip(f"published checkpoint not available at {SHARED_CKPT}")
    return BuiltUpExtractor.from_pretrained(str(SHARED_CKPT), sha256=PUBLISHED_SHA256)


# ---------------------------------------------------------------------------------------------
# DualStreamUNet / BuiltUpExtractor
@needs_ckpt
def test_checkpoint_keys_match_exactly() -> None:
    sd = raw_network()
    net = DualStreamUNet()
    result = net.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(net.state_dict()) == set(sd)
    for k, v in net.state_dict().items():
        assert v.shape == sd[k].shape, k


def test_parameter_count() -> None:
    n = sum(p.numel() for p in DualStreamUNet().parameters())
    assert n == 30261  # ~30 k; 18 of them are the two unused per-stream `outc` convs
    assert sum(p.numel() for n_, p in DualStreamUNet().named_parameters() if ".outc." not in n_) == 30243


@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 37, 53), (3, 15, 16), (1, 5, 3), (1, 1, 1)])
def test_output_shape_and_range(shape: tuple[int, int, int]) -> None:
    net = random_net()
    s1, s2 = realistic(*shape)
    with torch.no_grad():
        for a, b in ((s1, s2), (s1, None), (None, s2)):
            out = net(a, b)
            assert out.shape == (shape[0], 1, shape[1], shape[2])
            assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
        f1, f2 = net.features(s1, s2)
    assert f1 is not None and f2 is not None
    assert f1.shape == f2.shape == (shape[0], 8, shape[1], shape[2])


@pytest.mark.parametrize("weights", ["published", "random"])
@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 37, 53), (1, 29, 31), (2, 15, 50)])
def test_matches_functional_reference(weights: str, shape: tuple[int, int, int]) -> None:
    if weights == "published":
        if not SHARED_CKPT.is_file():
            pytest.skip(f"published checkpoint not available at {SHARED_CKPT}")
        net, sd = BuiltUpExtractor.from_pretrained(str(SHARED_CKPT)), raw_network()
    else:
        net = random_net(1)
        sd = net.state_dict()
    s1, s2 = realistic(*shape, seed=shape[1])
    with torch.no_grad():
        for a, b in ((s1, s2), (s1, None), (None, s2)):
            torch.testing.assert_close(net(a, b), reference_builtup(sd, a, b), atol=1e-4, rtol=0)


def test_features_feed_out_convs() -> None:
    net = random_net()
    s1, s2 = realistic(2, 33, 40)
    with torch.no_grad():
        f1, f2 = net.features(s1, s2)
        assert f1 is not None and f2 is not None
        torch.testing.assert_close(net(s1, s2), torch.sigmoid(net.fusion_out_conv(torch.cat([f1, f2], 1))))
        torch.testing.assert_close(net(s1, None), torch.sigmoid(net.sar_out_conv(f1)))
        torch.testing.assert_close(net(None, s2), torch.sigmoid(net.optical_out_conv(f2)))
        assert net.features(s1, None)[1] is None and net.features(None, s2)[0] is None


def test_published_weights_separate_town_from_vegetation(published: BuiltUpExtractor) -> None:
    with torch.no_grad():
        veg = published(*scene("vegetation")).mean().item()
        town = published(*scene("town")).mean().item()
        flat = published(*scene("flat")).mean().item()
        town_s1 = published(scene("town")[0], None).mean().item()
        town_s2 = published(None, scene("town")[1]).mean().item()
        veg_s2 = published(None, scene("vegetation")[1]).mean().item()
    assert veg < 0.01
    assert flat < 0.05
    assert town > 0.4 and town > 20 * max(veg, flat)
    assert town_s1 > 0.3 and town_s2 > 0.3 and veg_s2 < 0.05


def test_nan_means_band_mean() -> None:
    net = random_net()
    s1, s2 = realistic(1, 40, 40)
    s1n, s2n = s1.clone(), s2.clone()
    s2n[:, 2, 10:20, 5:25] = float("nan")
    s1n[:, :, 30:, :] = float("nan")
    s1f, s2f = s1.clone(), s2.clone()
    s2f[:, 2, 10:20, 5:25] = S2_MEAN[2]
    s1f[:, 0, 30:, :] = S1_MEAN[0]
    s1f[:, 1, 30:, :] = S1_MEAN[1]
    with torch.no_grad():
        out = net(s1n, s2n)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, net(s1f, s2f), atol=1e-5, rtol=0)
        all_nan = net(torch.full_like(s1, float("nan")), torch.full_like(s2, float("nan")))
        assert torch.isfinite(all_nan).all()


def test_bad_input_shapes() -> None:
    net = random_net()
    s1, s2 = realistic(1, 20, 20)
    with pytest.raises(PopcornInputError, match="s2"):
        net(s1, s2[:, :3])
    with pytest.raises(PopcornInputError, match="share"):
        net(s1, s2[..., :19])
    with pytest.raises(PopcornInputError):
        net(None, None)


# ---------------------------------------------------------------------------------------------
# from_pretrained
def _save_network(path: Path, net: torch.nn.Module) -> None:
    torch.save({"step": 1, "network": net.state_dict()}, path)


def test_from_pretrained_formats(tmp_path: Path) -> None:
    net = random_net(3)
    sd = net.state_dict()
    s1, s2 = realistic(1, 24, 24)
    with torch.no_grad():
        expected = net(s1, s2)
    _save_network(tmp_path / "a.pt", net)
    torch.save(sd, tmp_path / "b.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "c.ckpt")
    disc = dict(sd, **{"disc.fc.weight": torch.zeros(2, 2)})
    torch.save({"network": disc}, tmp_path / "d.pt")
    for name in ("a.pt", "b.pt", "c.ckpt", "d.pt"):
        loaded = BuiltUpExtractor.from_pretrained(str(tmp_path / name))
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(s1, s2), expected)


def test_from_pretrained_rejects_other_model(tmp_path: Path) -> None:
    other = tmp_path / "resnet.pt"
    torch.save({"network": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict()}, other)
    with pytest.raises(PopcornInputError) as info:
        BuiltUpExtractor.from_pretrained(str(other))
    msg = str(info.value)
    assert str(other) in msg and "missing keys" in msg and "unexpected keys" in msg and "0.weight" in msg
    # Same keys but a different width.
    wide = tmp_path / "wide.pt"
    sd = BuiltUpExtractor().state_dict()
    sd["fusion_out_conv.conv.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(sd, wide)
    with pytest.raises(PopcornInputError, match="shape mismatches"):
        BuiltUpExtractor.from_pretrained(str(wide))
    with pytest.raises(PopcornInputError, match="does not exist"):
        BuiltUpExtractor.from_pretrained(str(tmp_path / "nope.pt"))


class _Opaque:
    """Arbitrary pickled object: refused unless the file's hash is given."""


def test_untrusted_pickle_needs_hash(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"network": random_net().state_dict(), "extra": _Opaque()}, path)
    with pytest.raises(PopcornInputError, match="sha256"):
        BuiltUpExtractor.from_pretrained(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(BuiltUpExtractor.from_pretrained(str(path), sha256=digest), BuiltUpExtractor)


@needs_ckpt
def test_from_pretrained_wrong_sha(tmp_path: Path) -> None:
    with pytest.raises(PopcornInputError, match="sha256") as info:
        BuiltUpExtractor.from_pretrained(str(SHARED_CKPT), sha256="0" * 64)
    assert str(SHARED_CKPT) in str(info.value)
    # A file carrying the published name is checked automatically.
    bad = tmp_path / PUBLISHED_NAME
    data = bytearray(SHARED_CKPT.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(PopcornInputError, match=PUBLISHED_SHA256):
        BuiltUpExtractor.from_pretrained(str(bad))


@needs_ckpt
def test_from_pretrained_url_download_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        shutil.copyfile(SHARED_CKPT, dest)

    monkeypatch.setattr(builtup_mod, "_download", fake_download)
    monkeypatch.setenv("POPCORN_CACHE", str(tmp_path / "envcache"))
    net = BuiltUpExtractor.from_pretrained(PUBLISHED_URL)
    cached = tmp_path / "envcache" / PUBLISHED_NAME
    assert cached.is_file() and calls == [PUBLISHED_URL]
    assert not [p for p in cached.parent.iterdir() if p != cached]  # no temp file left
    BuiltUpExtractor.from_pretrained(PUBLISHED_URL)
    assert calls == [PUBLISHED_URL]  # served from the cache
    # Explicit cache_dir argument wins over the env var.
    BuiltUpExtractor.from_pretrained(PUBLISHED_URL, cache_dir=tmp_path / "argcache")
    assert (tmp_path / "argcache" / PUBLISHED_NAME).is_file() and len(calls) == 2
    key = "fusion_out_conv.conv.weight"
    torch.testing.assert_close(net.state_dict()[key], raw_network()[key])


def test_from_pretrained_url_bad_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def junk_download(url: str, dest: Path) -> None:
        dest.write_bytes(b"not a checkpoint")

    monkeypatch.setattr(builtup_mod, "_download", junk_download)
    with pytest.raises(PopcornInputError, match="sha256"):
        BuiltUpExtractor.from_pretrained(PUBLISHED_URL, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written kept


def test_from_pretrained_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / "mine.pt"
    src.parent.mkdir()
    _save_network(src, random_net(5))
    net = BuiltUpExtractor.from_pretrained(src.as_uri(), cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "mine.pt").is_file()
    key = "sar_out_conv.conv.bias"
    torch.testing.assert_close(net.state_dict()[key], random_net(5).state_dict()[key])


# ---------------------------------------------------------------------------------------------
# Popcorn
def test_popcorn_outputs() -> None:
    bu = random_net()
    model = Popcorn(bu).eval()
    s1, s2 = realistic(2, 37, 53)
    with torch.no_grad():
        out = model(s1, s2)
        assert set(out) == {"population", "builtup_score", "occupancy"}
        for v in out.values():
            assert v.shape == (2, 1, 37, 53) and torch.isfinite(v).all()
        torch.testing.assert_close(out["population"], out["builtup_score"] * out["occupancy"])
        torch.testing.assert_close(out["builtup_score"], bu(s1, s2))
        assert (out["occupancy"] >= 0).all()
    assert model.head[0].in_channels == 16
    assert model.head_last_layer is model.head[-1] and model.head_last_layer.out_channels == 2


def test_popcorn_pretrained_init_copies_weights() -> None:
    bu = random_net(2)
    model = Popcorn(bu)
    for k, v in bu.state_dict().items():
        torch.testing.assert_close(model.occupancy.state_dict()[k], v)
    scratch = Popcorn(random_net(2), occupancy_init="scratch")
    w = "sar_stream.inc.conv.conv.0.weight"
    assert not torch.equal(scratch.occupancy.state_dict()[w], bu.state_dict()[w])


def test_popcorn_load_builtup() -> None:
    model = Popcorn()
    bu = random_net(4)
    model.load_builtup(bu.state_dict())
    k = "optical_stream.up_seq.up1.conv.conv.3.weight"
    torch.testing.assert_close(model.builtup.state_dict()[k], bu.state_dict()[k])
    torch.testing.assert_close(model.occupancy.state_dict()[k], bu.state_dict()[k])
    assert not any(p.requires_grad for p in model.builtup.parameters())
    other = random_net(6)
    model.load_builtup(other, init_occupancy=False)
    torch.testing.assert_close(model.builtup.state_dict()[k], other.state_dict()[k])
    torch.testing.assert_close(model.occupancy.state_dict()[k], bu.state_dict()[k])
    scratch = Popcorn(occupancy_init="scratch")
    before = scratch.occupancy.state_dict()[k].clone()
    scratch.load_builtup(bu)
    torch.testing.assert_close(scratch.occupancy.state_dict()[k], before)
    with pytest.raises(PopcornInputError, match="missing keys"):
        model.load_builtup({"foo.weight": torch.zeros(1)})


def test_popcorn_training_freezes_builtup_and_bn() -> None:
    model = Popcorn(random_net())
    model.train()
    assert model.training and model.head.training and not model.builtup.training
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    bu_params = {k: v.clone() for k, v in model.builtup.named_parameters()}
    occ_w = model.occupancy.sar_stream.inc.conv.conv[0].weight
    occ_before = occ_w.detach().clone()
    head_before = model.head[0].weight.detach().clone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    s1, s2 = realistic(2, 30, 30)
    out = model(s1, s2)
    out["population"].sum().backward()
    assert all(p.grad is None for p in model.builtup.parameters())
    assert occ_w.grad is not None and occ_w.grad.abs().sum() > 0
    opt.step()
    for k, v in model.builtup.named_parameters():
        assert torch.equal(v, bu_params[k]), k
    for k, v in model.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, buffers[k]), k
    assert not torch.equal(occ_w.detach(), occ_before)
    assert not torch.equal(model.head[0].weight.detach(), head_before)
    model.eval()
    model.train(True)
    assert not model.builtup.training and all(not m.training for m in bns)


def test_popcorn_bias_init() -> None:
    model = Popcorn(random_net(), occupancy_bias=0.9407)
    assert model.head_last_layer.bias[0].item() == pytest.approx(0.9407)
    with torch.no_grad():
        model.head_last_layer.weight.zero_()
    s1, s2 = realistic(1, 20, 22)
    with torch.no_grad():
        out = model(s1, s2)
    torch.testing.assert_close(out["occupancy"], torch.full_like(out["occupancy"], 0.9407))
    model.set_occupancy_bias(0.4119)
    with torch.no_grad():
        torch.testing.assert_close(model(s1, s2)["occupancy"], torch.full((1, 1, 20, 22), 0.4119))


@pytest.mark.parametrize(
    "kwargs,in_ch",
    [
        ({"occupancy_split": False}, 16),
        ({"occupancy_init": "scratch"}, 16),
        ({"modalities": "s1"}, 8),
        ({"modalities": "s2"}, 8),
    ],
)
def test_popcorn_variants(kwargs: dict, in_ch: int) -> None:
    bu = random_net()
    model = Popcorn(bu, **kwargs)
    assert model.head[0].in_channels == in_ch
    s1, s2 = realistic(2, 25, 31)
    a = None if kwargs.get("modalities") == "s2" else s1
    b = None if kwargs.get("modalities") == "s1" else s2
    model.train()
    out = model(a, b)
    assert all(v.shape == (2, 1, 25, 31) for v in out.values())
    out["population"].mean().backward()
    assert model.head[0].weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(out["builtup_score"], bu(a, b))
        if kwargs.get("occupancy_split") is False:
            torch.testing.assert_close(out["population"], out["occupancy"])
            raw = model.head(torch.cat(model.occupancy.features(s1, s2), 1))[:, :1]
            torch.testing.assert_close(out["population"], torch.relu(raw))
        else:
            torch.testing.assert_close(out["population"], out["builtup_score"] * out["occupancy"])
    if "modalities" in kwargs:
        with pytest.raises(PopcornInputError):
            model(b, a)  # the required modality is missing


def test_popcorn_bad_args() -> None:
    with pytest.raises(PopcornInputError):
        Popcorn(modalities="rgb")  # type: ignore[arg-type]
    with pytest.raises(PopcornInputError):
        Popcorn(occupancy_init="imagenet")  # type: ignore[arg-type]


def test_double_conv_folds_frozen_bn_exactly() -> None:
    """Eval-mode DoubleConv (BN folded on the fly) = conv -> BN -> ReLU, values and gradients."""
    from popcorn.models.unet import DoubleConv

    torch.manual_seed(0)
    block = DoubleConv(4, 8)
    for bn in (block.conv[1], block.conv[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    block.eval()
    x = torch.randn(2, 4, 17, 23)
    fused = block(x)
    fused.square().sum().backward()
    fused_grad = block.conv[0].weight.grad.clone()
    block.zero_grad()
    plain = block.conv(x)  # the unfused modules
    plain.square().sum().backward()
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(fused_grad, block.conv[0].weight.grad, rtol=1e-4, atol=1e-5)
    block.train()  # training-mode BN (batch statistics) takes the unfused path
    assert torch.allclose(block(x), block.conv(x))
