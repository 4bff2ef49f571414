"""Test helper: a dask worker plugin that kills its worker (SIGKILL) when it starts its first task,
once per cluster (the first worker to claim the marker file dies), like a node lost mid-run."""

from __future__ import annotations

import os
import signal
from typing import Any

from distributed import WorkerPlugin


class DieOnFirstTask(WorkerPlugin):
    """Kill this worker's process at the first task it executes, if no worker has died yet."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing":
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # only one worker dies
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
