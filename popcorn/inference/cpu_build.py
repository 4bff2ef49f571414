"""Build and load POPCORN's C++ CPU kernels (``kernels.cpp``): compiled once per machine into the popcorn cache.

The source is compiled with the system C++ compiler (``$CXX``, else ``g++``/``c++``, ``-O3
-march=native``) into ``$POPCORN_CACHE/kernels`` (default ``~/.cache/popcorn/kernels``), keyed by
the source, the compiler and the CPU flags. Without a compiler, if the build fails, or with
``POPCORN_CPU_KERNELS=0``, :func:`load_kernels` returns None and the callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from popcorn.models.builtup import default_cache_dir

log = logging.getLogger(__name__)

SOURCE_FILE = Path(__file__).with_name("kernels.cpp")
"""The kernels' C++ source (package data), compiled on first use."""


SOURCE = SOURCE_FILE.read_text()


_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno")


_FALLBACK_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno")


_lock = threading.Lock()


_state: dict[str, Any] = {}


_VP, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$POPCORN_CACHE/kernels`` (default ``~/.cache/popcorn/kernels``)."""
    return default_cache_dir() / "kernels"


def _cpu_signature() -> str:
    """CPU model and instruction-set flags: a library built with -march=native is only reused on a same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = sorted({ln.strip() for ln in lines if ln.startswith(("flags", "model name", "Features", "CPU part"))})
    return "\n".join(keep) or f"{platform.machine()} {platform.processor()}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Kernels:
    """ctypes bindings of the compiled library (calls release the GIL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        conv = [_VP, _VP, _I, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _VP, _I, _I, _I]
        self.conv = {}
        for name in ("conv3x3_8x3", "conv3x3_16x1"):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = conv, None
            self.conv[name] = fn
        self.upconv = lib.upconv
        self.upconv.argtypes = [_VP, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _I, _I, _VP, _VP, _I, _I, _I]
        self.upconv.restype = None
        self.prepare = lib.prepare
        self.prepare.argtypes, self.prepare.restype = [_VP, _I, _I, _I, _I, _VP, _VP, _VP, _I, _I, _I], None
        self.outconv = lib.outconv
        self.outconv.argtypes, self.outconv.restype = [_VP, _I, _I, _I, _I, _I, _I, _VP, _F, _VP, _I, _I], None
        self.head = lib.head
        self.head.argtypes = [_VP, _I, _I, _I, _I, _I, _I, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F, _VP, _I, _F,
                              _I, _F, _VP, _VP, _I, _I]
        self.head.restype = None
        lib.popcorn_kernels_version.restype = _I
        self.version = int(lib.popcorn_kernels_version())


def _build(cxx: str, flags: tuple[str, ...], dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="popcorn-kernels-") as tmp:
        src = Path(tmp) / "popcorn_kernels.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / "popcorn_kernels.so"
        res = subprocess.run([cxx, *flags, "-o", str(out), str(src)], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} {' '.join(flags)} failed: {res.stderr.strip()[-2000:]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(out, staged)
        os.replace(staged, dest)  # atomic: concurrent processes never load a half-written library


def _build_and_load() -> Kernels | None:
    cxx = _compiler()
    if cxx is None:
        log.warning("popcorn: no C++ compiler found (set $CXX); CPU inference uses the slower PyTorch path")
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("popcorn: %s --version failed (%s); CPU inference uses the PyTorch path", cxx, err)
        return None
    errors = []
    fallback_dir = Path(tempfile.gettempdir()) / f"popcorn-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        key = hashlib.sha256("\0".join([SOURCE, cxx, version, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        for where in (kernel_cache_dir(), fallback_dir):  # a read-only home still gets the kernels
            path = where / f"popcorn_kernels_{key}.so"
            try:
                if not path.is_file():
                    log.info("popcorn: compiling the CPU inference kernels into %s (once, ~10 s)", path)
                    _build(cxx, flags, path)
                return Kernels(path)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
                errors.append(str(err))
                if isinstance(err, RuntimeError):  # the compiler failed: another directory will not help
                    break
    log.warning("popcorn: could not build the CPU kernels (%s); CPU inference uses the PyTorch path", errors[-1])
    return None


def load_kernels() -> Kernels | None:
    """The compiled kernels (built on first use, then cached on disk), or None if unavailable/disabled."""
    if os.environ.get("POPCORN_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "kernels" not in _state:
            _state["kernels"] = _build_and_load()
        return _state["kernels"]
