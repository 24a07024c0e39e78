"""Training on several processes with PyTorch's own DistributedDataParallel.

``torchrun`` starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; this module
reads them, joins the process group (gloo on CPU, nccl on CUDA) and offers the few
collectives the trainer needs. Without torchrun everything here is a no-op for one
process, so the trainer has a single code path.

Under torchrun's elastic agent (``--max-restarts N``) a failed worker group is stopped
and started again; this module also knows which attempt this is
(``TORCHELASTIC_RESTART_COUNT``), turns a collective that fails because another process
died into :class:`~charrnn.errors.PeerLostError` (so the survivor exits cleanly instead
of dying in a gloo traceback), and can ask the agent to end the job when a restart would
only repeat the same error (:meth:`Distributed.end_restarts`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import PeerLostError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    elastic: bool = False  # started by torchrun's agent, which may restart the worker group
    restart: int = 0  # which attempt of the worker group this is (0: the first)
    max_restarts: int = 0
    run_id: str | None = None  # torchrun's id of the job (TORCHELASTIC_RUN_ID), the same in every attempt

    @classmethod
    def from_env(cls) -> "Distributed":
        """The job torchrun describes in the environment (one process if none)."""
        env = os.environ
        elastic = "TORCHELASTIC_RUN_ID" in env
        restart = int(env.get("TORCHELASTIC_RESTART_COUNT", 0) or 0) if elastic else 0
        max_restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0) or 0) if elastic else 0
        job = {"elastic": elastic, "restart": restart, "max_restarts": max_restarts, "run_id": env.get("TORCHELASTIC_RUN_ID")}
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls(**job)
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), **job)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, logs, draws progress and writes checkpoints."""
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group; on CUDA each process takes the GPU of its local rank."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if self.elastic:
                # torchrun keeps one key-value store for every attempt of the job, and the process
                # group's keys have the same names each time: a restarted gloo group could read the
                # address a dead process of the previous attempt published, and wait for it forever.
                # A prefix per attempt keeps each attempt's keys apart.
                store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size))
                store = dist.PrefixStore(f"charrnn/attempt-{self.restart}", store)
                dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
            else:
                dist.init_process_group(backend=backend)
        return device

    def stop(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, what: str, run: Callable[[], T]) -> T:
        """Run a collective; a failure means another process is gone (our tensors are well formed)."""
        try:
            return run()
        except RuntimeError as exc:  # gloo and nccl raise RuntimeError (or its DistBackendError)
            raise peer_lost(what, exc) from None

    def sum(self, values: list[float], device: torch.device, timeout: float | None = None) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64).

        With ``timeout`` (seconds), a peer that does not take part in time counts as lost,
        instead of holding this process until the process group's own timeout (30 minutes).
        """
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if timeout is None:
            self._collective("summing a value over the processes", lambda: dist.all_reduce(t))
        else:
            work = dist.all_reduce(t, async_op=True)
            self._collective(
                f"agreeing to stop (no answer within {timeout:g} s)", lambda: work.wait(timeout=timedelta(seconds=timeout))
            )
        return t.tolist()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's (L, B, H) state along the batch dimension, in rank order."""
        return torch.cat(self.gather(tensor.contiguous()), dim=1)

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's copy of a same-shaped tensor, in rank order."""
        if not self.enabled:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective("gathering the training state", lambda: dist.all_gather(parts, tensor))
        return parts

    def barrier(self) -> None:
        if self.enabled:
            self._collective("waiting for the other processes", dist.barrier)

    def end_restarts(self) -> bool:
        """Ask torchrun's agent to end the job now instead of restarting it; True if it was asked.

        For an error every attempt would meet again (a corpus removed, a bad flag, a full
        disk): restarting would only loop until ``--max-restarts`` is spent. The agent has no
        "do not retry" exit code, so this process sends it SIGTERM, which makes it stop the
        workers and end the job. This process ignores the SIGTERM the agent then forwards,
        so that it can still print its error. Only where the parent process is torchrun's
        agent and restarts are left (with none left, the agent ends the job by itself).
        """
        if not self.elastic or self.restart >= self.max_restarts:
            return False
        agent = os.getppid()
        try:
            command = Path(f"/proc/{agent}/cmdline").read_bytes()
        except OSError:  # not Linux, or the parent is gone
            return False
        if b"torch.distributed.run" not in command and b"torchrun" not in command:
            return False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.kill(agent, signal.SIGTERM)
        except OSError:
            return False
        return True


def peer_lost(what: str, exc: BaseException) -> PeerLostError:
    """The error for a collective (or DDP's gradient exchange) that failed because a peer is gone."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # gloo prefixes its source file and line, and appends advice about "remote workers"
    detail = detail.split("] ", 1)[-1].split(". This is typically")[0][:200]
    return PeerLostError(
        f"another process of the job stopped while {what} ({detail}); this process ends without "
        "saving, and a torchrun with --max-restarts restarts the job from the run's last save"
    )
