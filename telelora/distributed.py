"""Data-parallel meta-training across processes and machines (``torchrun``).

Each rank meta-trains on its own subset of the LLMs; after every iteration the generators'
gradients are averaged over all ranks, so every rank applies the same update and holds
the same generators. Under ``torchrun --nproc_per_node N`` (or multi-node, with
``--nnodes`` and a rendezvous) the usual ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
variables select this; without them everything runs in one process and the collectives
are no-ops. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from telelora.errors import TeleLoRAError


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, timeout_minutes: float = 60.0) -> World:
        """Join the process group that ``torchrun`` describes (one process: no group)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            use_cuda = torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(local_rank)  # "cuda" below means this rank's GPU
            try:
                dist.init_process_group(
                    "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
                )
            except (RuntimeError, ValueError, KeyError) as err:
                raise TeleLoRAError(f"could not join the torchrun process group as rank {rank}/{size}: {err}") from err
        return cls(rank, size, local_rank)

    def shard(self, items: list) -> list:
        """This rank's share of ``items`` (round-robin, so shares differ by at most one)."""
        return items[self.rank :: self.size]

    def average_gradients(self, module: nn.Module, local_count: int) -> int:
        """Turn each rank's gradient *sums* over ``local_count`` examples into the mean over
        every example of every rank; return the total count. A parameter that no rank gave
        a gradient keeps ``grad = None``, exactly as in one process (AdamW skips it; a zero
        gradient would still get weight decay and momentum)."""
        params = list(module.parameters())
        if not self.active:
            total = local_count
        else:
            has_grad = [float(p.grad is not None) for p in params]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            flat = torch.cat([flat, flat.new_tensor(has_grad + [float(local_count)])])
            dist.all_reduce(flat)
            total = int(round(float(flat[-1])))
            any_grad = flat[-1 - len(params) : -1] > 0
            offset = 0
            for p, keep in zip(params, any_grad.tolist(), strict=True):
                chunk = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if not keep:
                    p.grad = None
                elif p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
        if total:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(total)
        return total

    def mean(self, value: float, count: int = 1) -> float:
        """Count-weighted mean of a per-rank scalar ``value`` (an average over ``count`` items)."""
        if not self.active:
            return value
        pair = torch.tensor([value * count, float(count)], dtype=torch.float64, device=self._device())
        dist.all_reduce(pair)
        return float(pair[0] / pair[1]) if pair[1] else float("nan")

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Make every rank start from rank 0's weights."""
        if self.active:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def check_identical(self, module: nn.Module) -> None:
        """Fail loudly if the ranks' weights have drifted apart (they never should)."""
        if not self.active:
            return
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise TeleLoRAError(f"generator weights differ across ranks (checksums {float(low)} .. {float(high)})")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the group once every rank is done with it: gloo can abort a rank (SIGABRT,
        "terminate called without an active exception") whose peer tears down first."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
