"""Prediction over many processes: each rank computes its share of the tiles into the tile store,
rank 0 assembles the maps (``popcorn predict --devices N [--num-nodes M]``, ``popcorn popvae-map
--devices N``): :func:`run_sharded` runs any engine function that takes ``device=`` and ``shard=``.

One machine: this process becomes rank 0 and starts ``devices - 1`` more (``torch.multiprocessing``,
a ``gloo`` group on 127.0.0.1, or ``nccl`` for GPUs). Several machines: start one process per
device with the launcher of the cluster (``srun``, ``torchrun``); each finds its rank in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, or
SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``). The tile store is shared (a path on a
shared file system for several machines): a rank that dies loses only its unfinished tiles, and
the next run resumes. Maps equal the one-process maps bit for bit (the same tiles, the same
arithmetic, only computed elsewhere).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from popcorn.errors import PopcornInputError
from popcorn.inference.maps import PredictResult, PredictSettings, predict
from popcorn.inference.popvae import predict_map
from popcorn.inference.tiles import Shard

__all__ = ["launched_rank", "predict_distributed", "predict_map_distributed", "run_sharded"]


def launched_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) set by a cluster launcher, or None when not launched so."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, size: int, local_rank: int, init: str, accelerator: str, threads: int | None,
               fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    import torch.distributed as dist

    backend = "nccl" if accelerator == "gpu" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    try:
        device = f"cuda:{local_rank}" if accelerator == "gpu" else "cpu"
        if accelerator == "gpu":
            torch.cuda.set_device(local_rank)
        if threads:
            torch.set_num_threads(threads)
        return fn(*args, device=device, shard=Shard.from_process_group(), **kwargs)
    finally:
        dist.destroy_process_group()


def _child(local_rank: int, size: int, init: str, accelerator: str, threads: int | None, fn: Callable[..., Any],
           args: tuple, kwargs: dict) -> None:
    _rank_main(local_rank + 1, size, local_rank + 1, init, accelerator, threads, fn, args, kwargs)


def run_sharded(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *, devices: int = 1, num_nodes: int = 1,
                accelerator: str = "cpu") -> Any:
    """``fn(*args, device=..., shard=..., **kwargs)`` on ``devices`` x ``num_nodes`` processes (see the
    module docstring); returns rank 0's result (None on the other ranks of a launched job). ``fn``
    must be importable (spawned processes pickle it) and return None on ranks other than 0."""
    if accelerator not in ("cpu", "gpu"):
        raise PopcornInputError(f"--accelerator must be cpu or gpu, got {accelerator!r}")
    if devices < 1 or num_nodes < 1:
        raise PopcornInputError(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if accelerator == "gpu" and torch.cuda.device_count() < devices:
        raise PopcornInputError(f"--devices {devices} GPUs asked for, {torch.cuda.device_count()} visible")
    launched = launched_rank()
    if launched is not None:  # srun / torchrun started this process as one rank of the job
        rank, size, local_rank = launched
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
        return _rank_main(rank, size, local_rank, f"tcp://{addr}:{port}", accelerator, None, fn, args, kwargs)
    if num_nodes > 1:
        raise PopcornInputError(
            "--num-nodes > 1: start one process per device on every node with the cluster's launcher "
            "(srun or torchrun, see docs/scaling.md); each process finds its rank in the environment"
        )
    if devices == 1:
        return fn(*args, device="cuda:0" if accelerator == "gpu" else "cpu", **kwargs)
    threads = max(1, (os.cpu_count() or devices) // devices) if accelerator == "cpu" else None
    init = f"tcp://127.0.0.1:{_free_port()}"
    import torch.multiprocessing as mp

    children = mp.start_processes(_child, args=(devices, init, accelerator, threads, fn, args, kwargs),
                                  nprocs=devices - 1, join=False, start_method="spawn")
    try:
        result = _rank_main(0, devices, 0, init, accelerator, threads, fn, args, kwargs)
    except BaseException:
        for proc in children.processes:
            if proc.is_alive():
                proc.terminate()
        raise
    while not children.join():
        pass
    return result


def predict_distributed(settings: PredictSettings, out_dir: str | os.PathLike[str], *, devices: int = 1,
                        num_nodes: int = 1, accelerator: str = "cpu", **kwargs: Any) -> PredictResult | None:
    """:func:`popcorn.inference.maps.predict` over ``devices`` x ``num_nodes`` processes."""
    return run_sharded(predict, (settings, str(Path(out_dir))), kwargs, devices=devices, num_nodes=num_nodes,
                       accelerator=accelerator)


def predict_map_distributed(model: Any, stack: Any, normalizer: Any, out: str | os.PathLike[str], *, devices: int = 1,
                            num_nodes: int = 1, accelerator: str = "cpu", **kwargs: Any) -> Path | None:
    """popVAE's :func:`popcorn.inference.popvae.predict_map` over ``devices`` x ``num_nodes`` processes."""
    return run_sharded(predict_map, (model, stack, normalizer, str(Path(out))), kwargs, devices=devices,
                       num_nodes=num_nodes, accelerator=accelerator)
