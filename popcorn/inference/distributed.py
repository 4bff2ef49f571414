"""Prediction over many processes: each rank computes its share of the tiles into the tile store,
rank 0 assembles the maps (``popcorn predict --devices N [--num-nodes M]``, ``popcorn popvae-map
--devices N``): :func:`run_sharded` runs any engine function that takes ``device=`` and ``shard=``.

The processes are Lightning's: a :class:`~lightning.fabric.Fabric` DDP strategy starts them and
forms the process group (``gloo`` on CPUs, ``nccl`` on GPUs). One machine: Fabric spawns
``devices`` processes. Several machines: start one process per device with the cluster's launcher
(``srun``, ``torchrun``); Fabric reads the rank from SLURM's or torchrun's environment and meets the
others at ``MASTER_ADDR:MASTER_PORT``. The tile store is shared (a path on a shared file system for
several machines): a rank that dies loses only its unfinished tiles, and the next run resumes.
Maps equal the one-process maps bit for bit (the same tiles, the same arithmetic, only computed
elsewhere).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from popcorn.errors import PopcornInputError
from popcorn.inference.maps import PredictResult, PredictSettings, predict
from popcorn.inference.popvae import predict_map
from popcorn.inference.tiles import Shard

__all__ = ["launched_externally", "predict_distributed", "predict_map_distributed", "run_sharded"]

#: How long a rank waits for the others (at the end, while they finish their tiles).
WAIT_FOR_OTHER_RANKS = timedelta(hours=12)


def launched_externally() -> bool:
    """True when a cluster launcher (``srun``, ``torchrun``) started this process as one rank of a job
    (Lightning's SLURM and torchelastic environments)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def _on_rank(fabric: Any, threads: int | None, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """One rank's work: ``fn`` on this rank's device with its shard of the tiles."""
    if threads:
        torch.set_num_threads(threads)
    try:  # (Fabric has made this rank's GPU the current CUDA device)
        result: Any = fn(*args, device=str(fabric.device), shard=Shard.from_process_group(), **kwargs)
    except PopcornInputError as err:  # the same inputs on every rank: rank 0 reports it in one line
        result = err
    except KeyboardInterrupt as err:  # torch's spawn wrapper would let the rank exit as a success
        raise RuntimeError(f"rank {fabric.global_rank} was interrupted") from err
    # Fabric hands rank 0's result back after rebuilding its dataclasses (to move tensors to the
    # CPU), which frozen ones refuse: it travels as bytes instead.
    return pickle.dumps(result)


def run_sharded(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *, devices: int = 1, num_nodes: int = 1,
                accelerator: str = "cpu") -> Any:
    """``fn(*args, device=..., shard=..., **kwargs)`` on ``devices`` x ``num_nodes`` processes (see the
    module docstring); returns rank 0's result (None on the other ranks of a launched job). ``fn``
    must be importable (spawned processes pickle it) and return None on ranks other than 0."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if accelerator not in ("cpu", "gpu"):
        raise PopcornInputError(f"--accelerator must be cpu or gpu, got {accelerator!r}")
    if devices < 1 or num_nodes < 1:
        raise PopcornInputError(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if accelerator == "gpu" and torch.cuda.device_count() < devices:
        raise PopcornInputError(f"--devices {devices} GPUs asked for, {torch.cuda.device_count()} visible")
    external = launched_externally()
    if num_nodes > 1 and not external:
        raise PopcornInputError(
            "--num-nodes > 1: start one process per device on every node with the cluster's launcher "
            "(srun or torchrun, see docs/scaling.md); each process finds its rank in the environment"
        )
    if devices == 1 and not external:
        return fn(*args, device="cuda:0" if accelerator == "gpu" else "cpu", **kwargs)
    # Spawned processes on this machine; processes a launcher already started only join the group.
    strategy = DDPStrategy(start_method="popen" if external else "spawn", timeout=WAIT_FOR_OTHER_RANKS)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    threads = max(1, (os.cpu_count() or devices) // devices) if accelerator == "cpu" and not external else None
    result = pickle.loads(fabric.launch(_on_rank, threads, fn, args, kwargs))
    if isinstance(result, PopcornInputError):
        raise result
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
