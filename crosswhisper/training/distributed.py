"""Training on several processes (`accelerate launch`, torchrun): data-parallel Algorithm 3.

Every process draws its own utterances, cuts and drafts from its own generator and keeps its
own replay buffer; before clipping, the LoRA weights' gradients are averaged over the
processes, so every process takes the same optimizer step and holds the same adapter. One
optimizer step then sees processes × `utterances_per_step` utterances. Rank 0 is seeded with
`config.seed` exactly as a single-process run (which it reproduces draw for draw); rank r > 0
with a seed derived from (seed, r).

The model stays on the CPU as in a single-process run: the processes talk over gloo
(`Accelerator(cpu=True)`). accelerate is optional: a single process (WORLD_SIZE unset or 1,
no accelerator passed) never imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import timedelta
from typing import Iterator, Sequence

import torch

# main_process_first() keeps the other processes waiting at a barrier while the main one
# prepares the examples (teacher transcripts: tens of minutes on a CPU for a large set);
# torch's default of 30 min would end the run there.
BARRIER_TIMEOUT = timedelta(hours=12)
# where launchers put the number of processes (torchrun / accelerate launch; MPI, which
# accelerate uses for multi-CPU configurations), as accelerate reads them
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    return max([int(os.environ.get(name, "1")) for name in WORLD_SIZE_VARIABLES])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a process's generator: `seed` itself for rank 0 (a single-process run draws
    exactly as before), a hash of (seed, rank) for the others (no clash with other seeds)."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"crosswhisper/{seed}/{rank}".encode()).digest()[:8], "little") >> 1


class Processes:
    """The processes of a training run: one (no accelerate needed) or several in one process
    group, set up by an accelerate `Accelerator`."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.count = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0

    @classmethod
    def from_environment(cls, accelerator=None) -> Processes:
        """Several processes when launched so (WORLD_SIZE > 1: `accelerate launch`, torchrun;
        or MPI) or when given an Accelerator; else one, without importing accelerate."""
        if isinstance(accelerator, Processes):
            return accelerator
        world = launched_processes()
        if accelerator is None:
            if world <= 1:
                return cls(None)
            try:
                from accelerate import Accelerator
                from accelerate.utils import InitProcessGroupKwargs
            except ImportError:
                raise ImportError(
                    f"{world} processes were launched: training on several processes needs accelerate (pip install accelerate)"
                ) from None
            # the model is trained on the CPU: gloo, whatever devices the machine has
            accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)])
        if accelerator.num_processes != world and world > 1:
            raise RuntimeError(
                f"{world} processes were launched but accelerate set up {accelerator.num_processes}: "
                "the processes would train alone and overwrite each other's checkpoints"
            )
        return cls(accelerator)

    def __repr__(self) -> str:
        return f"Processes(rank={self.rank}, count={self.count})"

    def main_process_first(self) -> contextlib.AbstractContextManager:
        """The main process runs the block first (e.g. writes a cache), the others then (read it)."""
        return self.accelerator.main_process_first() if self.count > 1 else contextlib.nullcontext()

    def wait(self) -> None:
        """A barrier (nothing with one process)."""
        if self.count > 1:
            self.accelerator.wait_for_everyone()

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order, on every process."""
        if self.count == 1:
            return [obj]
        output = [None] * self.count
        torch.distributed.all_gather_object(output, obj)
        return output

    def mean_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its mean over the processes (one all-reduce of
        all of them; a missing gradient counts as zeros). Nothing with one process."""
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.count
        for p, chunk in zip(params, _split(flat, params)):
            p.grad = chunk.view_as(p).clone()

    def check_identical(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Raise if the processes' parameters differ (they must: same start, same averaged steps)."""
        if self.count == 1:
            return
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        digests = self.gather(digest.hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"the processes' adapters diverged (weights' sha256 per rank: {digests})")

    def main_only(self) -> bool:
        """After training: every process waits for the others; the main one goes on (True), the
        others end their process group (False: they hold the same adapter, nothing left to do)."""
        self.wait()
        if not self.is_main:
            self.close()
        return self.is_main

    def close(self) -> None:
        """End the process group (nothing with one process)."""
        if self.count > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _split(flat: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> Iterator[torch.Tensor]:
    offset = 0
    for p in params:
        yield flat[offset : offset + p.numel()]
        offset += p.numel()

