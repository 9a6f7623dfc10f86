"""Stopping cleanly when Slurm says a job must end: pre-timeout signal, preemption, requeue.

Slurm signals every rank (`#SBATCH --signal=USR2@120` before the time limit; SIGTERM when a job
is preempted, cancelled or requeued), but the ranks see it at different moments, possibly in
different steps. A rank that stopped on its own would leave its peers blocked in the next
collective. So the handler only sets a local flag, and at every step end all ranks take the MAX
of their flags in one tiny all-reduce: they agree to stop after the same step, write one
checkpoint together and exit normally. Rank 0 then leaves `preempted.json` in the run directory,
which tells the batch script to requeue the job; the requeued attempt resumes from the
checkpoint (train.resume=auto).

SIGTERM is only taken over inside a Slurm job: the local supervisor uses it to stop ranks at
once when a peer has died. A second SIGTERM always terminates immediately.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MARKER = "preempted.json"
"""Written by rank 0 when the ranks stopped early on a signal with a checkpoint saved."""

Handler = Callable[[int, Any], Any] | int | None


def signals_to_catch(cluster_signal: str, environ: dict[str, str] | None = None) -> list[signal.Signals]:
    env = os.environ if environ is None else environ
    wanted = {signal.SIGUSR2, getattr(signal, f"SIG{cluster_signal.upper().removeprefix('SIG')}", signal.SIGUSR2)}
    if "SLURM_JOB_ID" in env:
        wanted.add(signal.SIGTERM)
    return sorted(wanted)


@dataclass
class Preemption:
    """Installed by the training loop on every rank; `agreed()` is a collective."""

    signals: list[signal.Signals]
    cluster_signal: str = "USR2"
    received: str | None = None
    stopped: bool = False
    previous: dict[signal.Signals, Handler] = field(default_factory=dict)

    @classmethod
    def install(cls, cluster_signal: str = "USR2") -> Preemption:
        self = cls(signals=signals_to_catch(cluster_signal), cluster_signal=cluster_signal.upper().removeprefix("SIG"))
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def close(self) -> None:
        """Restore the previous handlers. After a stop on a signal, hand the signal on to a handler
        installed before ours (submitit's requeues the job): last, because a requeue ends the job."""
        name = self.received or f"SIG{self.cluster_signal}"
        sig = next((s for s in self.previous if s.name == name), None)
        before = self.previous.get(sig) if sig is not None else None
        for old_sig, old in self.previous.items():
            signal.signal(old_sig, old if old is not None else signal.SIG_DFL)
        self.previous.clear()
        if self.stopped and callable(before) and before is not signal.default_int_handler:
            before(int(sig), None)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGTERM:
            # Asked twice: a rank stuck in a collective must still be stoppable.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or name
        print(f"vptrain: got {name}; stopping with a checkpoint after this step", flush=True)

    def agreed(self, device: Any) -> bool:
        """True on every rank when any rank was signalled (MAX all-reduce of the local flags)."""
        import torch
        import torch.distributed as dist

        local = 1 if self.received is not None else 0
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return bool(local)
        flag = torch.tensor([local], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def record(self, run_dir: str, *, step: int, total_steps: int, is_logger: bool) -> None:
        """After the checkpoint: rank 0 leaves the marker that makes the batch script requeue the job."""
        self.stopped = True
        if is_logger:
            marker = {"step": step, "steps": total_steps, "signal": self.received or "another rank",
                      "time": time.time()}
            tmp = os.path.join(run_dir, MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump(marker, f)
            os.replace(tmp, os.path.join(run_dir, MARKER))
            print(f"vptrain: stopped after step {step}/{total_steps} with a checkpoint; "
                  "a requeued job resumes from it", flush=True)
