"""Built-up extractor: the dual-stream U-Net plus loading of the published / our own weights."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from popcorn.errors import PopcornInputError
from popcorn.io import atomic_path
from popcorn.models.unet import DualStreamUNet

PUBLISHED_URL = (
    "https://github.com/prs-eth/Popcorn/raw/main/model/DDA_model/checkpoints/networks/"
    "fusionda_newAug8_16_checkpoint30_lossweight0.5.pt"
)
PUBLISHED_SHA256 = "0c1244fcf15a99bf887233b90c5830965e4696e1a44fae01d2e70f4b5368d248"
_PUBLISHED_NAME = PUBLISHED_URL.rsplit("/", 1)[-1]
_AUTO = "auto"


def default_cache_dir() -> Path:
    """Download cache: ``$POPCORN_CACHE`` if set, else ``~/.cache/popcorn``."""
    env = os.environ.get("POPCORN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "popcorn"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Copy ``url`` to ``dest`` (plain urllib; monkeypatched in tests)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "file")


def fetch(url: str, cache_dir: str | os.PathLike[str] | None = None, sha256: str | None = None) -> Path:
    """Return the cached copy of ``url``, downloading it once (temp file, check hash, rename)."""
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint.pt"
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = dest / name
    if dest.exists():
        return dest
    try:
        with atomic_path(dest) as tmp:
            _download(url, tmp)
            if sha256 is not None:
                got = sha256_of(tmp)
                if got != sha256.lower():
                    raise PopcornInputError(
                        f"Download of {url} has sha256 {got}, expected {sha256}; the file was not "
                        f"kept. Check the URL or fetch the file by hand into {dest.parent}."
                    )
    except PopcornInputError:
        raise
    except OSError as e:  # URLError is an OSError
        raise PopcornInputError(
            f"Could not download {url} ({e}). Without internet, copy the file to {dest} "
            f"(cache dir: argument cache_dir, env POPCORN_CACHE, default ~/.cache/popcorn)."
        ) from e
    return dest


def _extract_state_dict(obj: Any, path: str | Path) -> dict[str, Tensor]:
    """Find the network weights in a torch.save'd object and drop what is not ours."""
    if isinstance(obj, Mapping) and isinstance(obj.get("network"), Mapping):
        sd = dict(obj["network"])
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # Lightning checkpoint of BuiltUpTask: weights live under "model.".
        sd = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        if not sd:
            sd = dict(obj["state_dict"])
    elif isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        raise PopcornInputError(
            f"{path} holds no state dict (expected a dict with 'network' or 'state_dict', or a plain "
            f"state dict; got {type(obj).__name__}). Pass a built-up extractor checkpoint."
        )
    return {k: v for k, v in sd.items() if not k.startswith("disc.")}


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class BuiltUpExtractor(DualStreamUNet):
    """Pretrained dual-stream U-Net giving a built-up score in [0,1] per 10 m pixel.

    ``net(s1, s2)`` takes raw S1 VV,VH (dB) and S2 B02,B03,B04,B08 (reflectance x 1e4) with NaN
    for missing values; either modality may be None (single-stream out conv).
    """

    def load_checked(self, sd: Mapping[str, Tensor], source: str) -> None:
        """``load_state_dict(strict=True)`` with an error that names the file and the bad keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        wrong = [
            f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
            for k in own
            if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing keys: {_list(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_list(unexpected)}")
            if wrong:
                parts.append(f"shape mismatches: {_list(wrong)}")
            raise PopcornInputError(
                f"{source} is not a POPCORN built-up extractor checkpoint ({'; '.join(parts)}). "
                f"Use the published weights ({PUBLISHED_URL}) or a BuiltUpTask checkpoint."
            )
        self.load_state_dict(sd, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        path_or_url: str | os.PathLike[str] = PUBLISHED_URL,
        sha256: str | None = _AUTO,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> BuiltUpExtractor:
        """Build the extractor from a local file or an http(s)/file URL (cached), in eval mode.

        ``sha256="auto"`` checks the published hash when the source is the published URL or file
        name; pass a hex digest to check any file, or None to skip. Files are loaded with
        ``weights_only=True``; full unpickling is used only for a file whose hash was verified.
        """
        src = os.fspath(path_or_url)
        if sha256 == _AUTO:
            is_published = src == PUBLISHED_URL or Path(urllib.parse.urlparse(src).path).name == _PUBLISHED_NAME
            sha256 = PUBLISHED_SHA256 if is_published else None
        if _is_url(src):
            path = fetch(src, cache_dir=cache_dir, sha256=sha256)
        else:
            path = Path(src).expanduser()
            if not path.is_file():
                raise PopcornInputError(f"Checkpoint file {path} does not exist; give a path or an http(s) URL.")
        verified = False
        if sha256 is not None:
            got = sha256_of(path)
            if got != sha256.lower():
                raise PopcornInputError(
                    f"{path} has sha256 {got}, expected {sha256}. The file is corrupt or not the one "
                    f"expected; delete it and download it again (or pass sha256=None to skip the check)."
                )
            verified = True
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal
            if not verified:
                raise PopcornInputError(
                    f"{path} cannot be loaded as plain weights ({type(e).__name__}: {e}). If you trust "
                    f"the file, pass its sha256=... to allow full unpickling."
                ) from e
            obj = torch.load(path, map_location="cpu", weights_only=False)
        net = cls()
        net.load_checked(_extract_state_dict(obj, path), str(path))
        return net.eval()
