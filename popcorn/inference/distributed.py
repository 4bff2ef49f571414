"""Prediction over many processes: each rank computes its share of the tiles into the tile store,
rank 0 assembles the maps (``popcorn predict --devices N [--num-nodes M]``).

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
from pathlib import Path
from typing import Any

import torch

from popcorn.errors import PopcornInputError
from popcorn.inference.maps import PredictResult, PredictSettings, predict
from popcorn.inference.tiles import Shard

__all__ = ["launched_rank", "predict_distributed"]


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


def _rank_main(rank: int, size: int, local_rank: int, init: str, accelerator: str, args: tuple, kwargs: dict
               ) -> PredictResult | None:
    import torch.distributed as dist

    backend = "nccl" if accelerator == "gpu" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    try:
        device = f"cuda:{local_rank}" if accelerator == "gpu" else "cpu"
        if accelerator == "gpu":
            torch.cuda.set_device(local_rank)
        return predict(*args, device=device, shard=Shard.from_process_group(), **kwargs)
    finally:
        dist.destroy_process_group()


def _child(local_rank: int, size: int, init: str, accelerator: str, args: tuple, kwargs: dict) -> None:
    _rank_main(local_rank + 1, size, local_rank + 1, init, accelerator, args, kwargs)


def predict_distributed(settings: PredictSettings, out_dir: str | os.PathLike[str], *, devices: int = 1,
                        num_nodes: int = 1, accelerator: str = "cpu", **kwargs: Any) -> PredictResult | None:
    """:func:`popcorn.inference.maps.predict` over ``devices`` x ``num_nodes`` processes (see the module
    docstring); returns rank 0's result (None on the other ranks of a launched job)."""
    if accelerator not in ("cpu", "gpu"):
        raise PopcornInputError(f"--accelerator must be cpu or gpu, got {accelerator!r}")
    if devices < 1 or num_nodes < 1:
        raise PopcornInputError(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if accelerator == "gpu" and torch.cuda.device_count() < devices:
        raise PopcornInputError(f"--devices {devices} GPUs asked for, {torch.cuda.device_count()} visible")
    args = (settings, str(Path(out_dir)))
    launched = launched_rank()
    if launched is not None:  # srun / torchrun started this process as one rank of the job
        rank, size, local_rank = launched
        addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
        return _rank_main(rank, size, local_rank, f"tcp://{addr}:{port}", accelerator, args, kwargs)
    if num_nodes > 1:
        raise PopcornInputError(
            "--num-nodes > 1: start one process per device on every node with the cluster's launcher "
            "(srun or torchrun, see docs/scaling.md); each process finds its rank in the environment"
        )
    if devices == 1:
        return predict(*args, device="cuda:0" if accelerator == "gpu" else "cpu", **kwargs)
    if accelerator == "cpu" and kwargs.get("threads") is None:
        kwargs["threads"] = max(1, (os.cpu_count() or devices) // devices)
    init = f"tcp://127.0.0.1:{_free_port()}"
    import torch.multiprocessing as mp

    children = mp.start_processes(_child, args=(devices, init, accelerator, args, kwargs), nprocs=devices - 1,
                                  join=False, start_method="spawn")
    try:
        result = _rank_main(0, devices, 0, init, accelerator, args, kwargs)
    except BaseException:
        for proc in children.processes:
            if proc.is_alive():
                proc.terminate()
        raise
    while not children.join():
        pass
    return result
