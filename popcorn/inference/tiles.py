"""The model-agnostic tile engine: tile cores, prefetched reads, a resumable tile store and COG assembly.

A caller gives a :class:`~popcorn.samplers.tiles.TileGridSampler` (tile GeoSlices over an area
of the grid, each carrying its ``core`` and ``read`` pixel windows); a *reader factory* (called
once inside a background thread that owns its dataset handles) returning ``read(query) -> data``;
a *model runner* ``runner(core, read, data) -> {name: float32 array on the core}``; a resume
``key``. Each finished tile is saved atomically to ``<work>/tiles/`` (named by its core) and
listed in ``<work>/state.json`` (a rerun with the same key skips finished tiles); the products
(:class:`Product`) are assembled window by window into temporary files and renamed only when
complete (COG, nodata -1, provenance tags); a caller may record the finished run
(:class:`FinishedRecord`) to reuse it on a rerun of the same settings. POPCORN's maps
(:mod:`popcorn.inference.maps`) and popVAE's (:mod:`popcorn.inference.popvae`) use it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window as RioWindow

from popcorn.datasets.grid import RasterGrid, Window
from popcorn.datasets.samples import TileQuery
from popcorn.io import atomic_path, geotiff_profile
from popcorn.samplers.tiles import TileGridSampler

log = logging.getLogger(__name__)


FINE = 10
"""10 m pixels per side of a 1 ha cell."""


ALIGN = 20
"""Area and tile origins are multiples of this many px (1 ha cells x U-Net pooling phase)."""


NODATA = -1.0


PARTIAL_DIR = ".popcorn-partial"


FINISHED_RECORD = "prediction.json"
"""The record of a finished run beside its products (:class:`FinishedRecord`)."""


STATE_VERSION = 1


def block_sum_partial(array: np.ndarray, valid: np.ndarray, factor: int = FINE) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``factor`` x ``factor`` blocks of the valid pixels (edge blocks may be partial).

    Returns (sums float64, number of valid pixels per block).
    """
    h, w = array.shape
    H, W = -(-h // factor), -(-w // factor)
    pad = ((0, H * factor - h), (0, W * factor - w))
    a = np.pad(np.where(valid, array, 0.0).astype(np.float64), pad)
    v = np.pad(valid.astype(np.int32), pad)
    sums = a.reshape(H, factor, W, factor).sum(axis=(1, 3))
    counts = v.reshape(H, factor, W, factor).sum(axis=(1, 3))
    return sums, counts


# ============================================================================= the engine
OpenReader = Callable[[], Callable[[TileQuery], Any]]
"""Called once in the reader thread; returns ``read(query) -> data`` (handles owned by that thread)."""


Runner = Callable[[Window, Window, Any], dict[str, np.ndarray]]
"""``runner(core, read, data) -> {name: float32 array}`` for one tile (NaN = nodata)."""


class TileReader:
    """Reads the data of each tile query in a background thread (prefetch queue).

    ``open_reader`` is called inside the thread, so the dataset handles it opens are owned by
    that thread (GDAL handles are not shared between threads).
    """

    def __init__(self, open_reader: OpenReader, queries: Sequence[TileQuery], prefetch: int = 2) -> None:
        self.open_reader = open_reader
        self.queries = list(queries)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="popcorn-reader")
        self.thread.start()

    def _run(self) -> None:
        try:
            read_fn = self.open_reader()
            for query in self.queries:
                if self._stop.is_set():
                    return
                self.queue.put((query, read_fn(query)))
            self.queue.put(None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self.queue.put(err)

    def __iter__(self) -> Iterator[tuple[TileQuery, Any]]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass


class _Interrupted(KeyboardInterrupt):
    """Raised by ``stop_after`` to simulate a crash (a KeyboardInterrupt, like Ctrl-C)."""


@dataclass(frozen=True)
class Shard:
    """This process's part of a prediction over ``size`` processes (rank ``rank``).

    ``barrier`` waits for every process (``torch.distributed.barrier`` under a process group);
    the default is one process, no waiting.
    """

    rank: int = 0
    size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @staticmethod
    def from_process_group() -> Shard:
        """The shard of this process in the default ``torch.distributed`` group (or one process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return Shard()
        return Shard(dist.get_rank(), dist.get_world_size(), dist.barrier)


def _atomic_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def file_fingerprints(paths: Iterable[str | os.PathLike[str]]) -> list[list[Any]]:
    """``[path, size in bytes, modification time in ns]`` of each file, in the order given: enough
    to tell that a file was replaced, rewritten or removed since a run read or wrote it."""
    rows = []
    for path in paths:
        stat = os.stat(path)
        rows.append([str(path), stat.st_size, stat.st_mtime_ns])
    return rows


@dataclass
class FinishedRecord:
    """The record of a finished run, written beside its products: its ``key``, the fingerprints of
    the files it read and of the files it wrote, and a ``summary`` for its caller. A rerun with the
    same key on unchanged inputs whose outputs are all still there, unchanged, reuses them instead
    of predicting anew; anything else (other settings, a rewritten input, a missing or edited
    output, an unreadable record) means predicting anew."""

    path: Path

    def reusable(self, key: str, inputs: list[list[Any]], *, resume: bool, owner: bool) -> dict[str, Any] | None:
        """The finished run to reuse (:meth:`read`), or None after the ``owner`` process (rank 0)
        has forgotten the record, whose outputs are about to be overwritten (``resume=False``: never
        reuse)."""
        finished = self.read(key, inputs) if resume else None
        if finished is None and owner:
            self.path.unlink(missing_ok=True)  # a crash from here on leaves no record
        return finished

    def read(self, key: str, inputs: list[list[Any]]) -> dict[str, Any] | None:
        """The record's ``{"outputs": {name: path}, "summary": ...}`` if it still holds, else None."""
        try:
            record = json.loads(self.path.read_text())
            if record["key"] != key or record["inputs"] != inputs:
                return None
            outputs = {name: Path(path) for name, (path, _, _) in record["outputs"].items()}
            if file_fingerprints(outputs.values()) != list(record["outputs"].values()):
                return None
            return {"outputs": outputs, "summary": record["summary"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, key: str, inputs: list[list[Any]], outputs: dict[str, Path], summary: dict[str, Any]) -> None:
        """Record a finished run (atomically, after every output is in place)."""
        written = dict(zip(outputs, file_fingerprints(outputs.values())))
        _atomic_json(self.path, {"key": key, "inputs": inputs, "outputs": written, "summary": summary})


def _tile_name(core: Window) -> str:
    return f"tile_r{core[0]}_c{core[1]}.npz"


def _save_tile(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


@dataclass
class TileRun:
    """The finished tiles of a :func:`run_tiles` call (in ``work/tiles``)."""

    work: Path
    cores: list[Window]
    computed: int

    @property
    def tiles_dir(self) -> Path:
        return self.work / "tiles"

    def load(self, core: Window, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The arrays of a finished tile (only ``keys`` if given)."""
        with np.load(self.tiles_dir / _tile_name(core)) as z:
            return {k: z[k] for k in (z.files if keys is None else keys)}

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def run_tiles(
    tiles: TileGridSampler,
    open_reader: OpenReader,
    runner: Runner,
    work: str | os.PathLike[str],
    key: str,
    info: dict[str, Any] | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    desc: str = "predict",
    stop_after: int | None = None,
    on_tile: Callable[[Window], None] | None = None,
    prefetch: int = 2,
    shard: Shard | None = None,
) -> TileRun:
    """Run ``runner`` on every tile of ``tiles`` not finished yet (see the module docstring).

    ``key`` identifies the run (a rerun resumes only with the same key); ``info`` is stored in
    ``state.json`` for humans. ``stop_after`` (tests, benchmarks) stops after computing that many
    tiles, leaving the partial state as a crash would; ``on_tile`` is called with each computed
    core. With a ``shard`` (rank r of n processes), rank 0 prepares the tile store, every rank
    computes the unfinished tiles ``r, r + n, ...`` into it, and all wait for each other at the
    end: a finished tile is a tile file (written atomically), whoever wrote it.
    """
    work = Path(work)
    cores = list(tiles.cores)
    tiles_dir = work / "tiles"
    state_path = work / "state.json"
    shard = shard or Shard()
    if shard.rank == 0:
        _prepare_store(work, key, info, len(cores), resume)
    shard.barrier()
    finished = _finished_tiles(tiles_dir)
    state = json.loads(state_path.read_text())
    todo = [q for q in tiles if _tile_name(q.core) not in finished][shard.rank :: shard.size]
    computed = _compute_tiles(todo, len(cores), finished, open_reader, runner, tiles_dir,
                              state_path if shard.size == 1 else None, state, progress and shard.rank == 0, desc,
                              stop_after, on_tile, prefetch)
    shard.barrier()  # (a rank that failed never gets here: the others wait, the launcher stops them)
    return TileRun(work, cores, computed)


def _finished_tiles(tiles_dir: Path) -> set[str]:
    """Names of the finished tiles: the tile files (a temporary ``.name.tmp-pid.npz`` is not one)."""
    return {p.name for p in tiles_dir.glob("*.npz") if not p.name.startswith(".")}


def _prepare_store(work: Path, key: str, info: dict[str, Any] | None, n_tiles: int, resume: bool) -> None:
    """Keep the tile store of the same run (``key``), or start an empty one; write ``state.json``."""
    tiles_dir = work / "tiles"
    state_path = work / "state.json"
    if work.exists():
        state = None
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = None
        if resume and state and state.get("key") == key:
            log.info("resuming: %d of %d tiles already finished", len(_finished_tiles(tiles_dir)), n_tiles)
        else:
            if state and state.get("key") != key:
                log.warning("discarding the partial run in %s (made with other settings)", work)
            shutil.rmtree(work)
    tiles_dir.mkdir(parents=True, exist_ok=True)
    finished = sorted(_finished_tiles(tiles_dir))
    _atomic_json(state_path, {"key": key, **(info or {}), "tiles": n_tiles, "finished": finished})


def _compute_tiles(todo: list[TileQuery], n_tiles: int, finished: set[str], open_reader: OpenReader,
                   runner: Runner, tiles_dir: Path, state_path: Path | None, state: dict[str, Any], progress: bool,
                   desc: str, stop_after: int | None, on_tile: Callable[[Window], None] | None, prefetch: int) -> int:
    """Compute ``todo`` with a prefetching reader; returns how many tiles were computed."""
    computed = 0
    if todo:
        reader = TileReader(open_reader, todo, prefetch)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_tiles, initial=n_tiles - len(todo), unit="tile", desc=desc)
        try:
            for query, data in reader:
                name = _tile_name(query.core)
                _save_tile(tiles_dir / name, runner(query.core, query.read, data))
                finished.add(name)
                if state_path is not None:  # one process: the list of finished tiles, for humans
                    state["finished"] = sorted(finished)
                    _atomic_json(state_path, state)
                computed += 1
                if on_tile is not None:
                    on_tile(query.core)
                if bar is not None:
                    bar.update(1)
                if stop_after is not None and computed >= stop_after:
                    raise _Interrupted()
        finally:
            reader.close()
            if bar is not None:
                bar.close()
    return computed


# ----------------------------------------------------------------------------- writing
def _profile(width: int, height: int, transform: Affine, crs: Any) -> dict[str, Any]:
    return geotiff_profile(height, width, crs=crs, transform=transform, nodata=NODATA, predictor=3, BIGTIFF="IF_SAFER")


class StreamedGeoTIFF:
    """A single-band float32 GeoTIFF (nodata -1) written window by window under a temporary
    name, then converted to a Cloud-Optimized GeoTIFF and renamed to its final name by
    :meth:`finish`."""

    def __init__(self, final: Path, work: Path, width: int, height: int, transform: Affine, crs: Any,
                 band: str, tags: dict[str, str]) -> None:
        self.final = Path(final)
        self.tmp = Path(work) / f"{self.final.stem}.building.tif"
        self.dst = rasterio.open(self.tmp, "w", **_profile(width, height, transform, crs))
        self.dst.set_band_description(1, band)
        self.dst.update_tags(**tags)

    def write(self, array: np.ndarray, row: int, col: int) -> None:
        data = np.where(np.isfinite(array), array, NODATA).astype(np.float32)
        self.dst.write(data[None], window=RioWindow(col, row, data.shape[1], data.shape[0]))

    def finish(self) -> Path:
        self.dst.close()
        with atomic_path(self.final) as tmp:
            try:
                rasterio.shutil.copy(self.tmp, tmp, driver="COG", compress="DEFLATE", predictor="3",
                                     bigtiff="IF_SAFER", overview_resampling="average")
            except Exception as err:  # noqa: BLE001 - GDAL without the COG driver: plain tiled
                log.warning("COG driver unavailable (%s); writing a tiled GeoTIFF", err)
                shutil.copyfile(self.tmp, tmp)
        self.tmp.unlink(missing_ok=True)
        return self.final

    def abort(self) -> None:
        try:
            self.dst.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass
class Product:
    """One output GeoTIFF of :func:`assemble`.

    ``key`` names the tile array written (or the product, when ``make(arrays, core)`` computes it
    from a tile's arrays); ``factor``: an output pixel is ``factor`` x ``factor`` grid pixels
    (the tile arrays of the product are on that coarser grid).
    """

    key: str
    path: Path
    band: str
    tags: dict[str, str]
    factor: int = 1
    make: Callable[[dict[str, np.ndarray], Window], np.ndarray] | None = None


def assemble(products: Sequence[Product], grid: RasterGrid, window: Window, run: TileRun) -> dict[str, Path]:
    """Write every product from the finished tiles of ``run`` (one streamed pass over the tiles)."""
    r0, c0, h, w = window
    writers: dict[str, StreamedGeoTIFF] = {}
    try:
        for p in products:
            f = p.factor
            writers[p.key] = StreamedGeoTIFF(p.path, run.work, -(-w // f), -(-h // f),
                                             grid.window_transform(window, f), grid.crs, p.band, p.tags)
        for core in run.cores:
            arrays = run.load(core)
            for p in products:
                data = p.make(arrays, core) if p.make is not None else arrays[p.key]
                writers[p.key].write(data, (core[0] - r0) // p.factor, (core[1] - c0) // p.factor)
        return {key: writer.finish() for key, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            if not writer.dst.closed:
                writer.abort()
        raise
