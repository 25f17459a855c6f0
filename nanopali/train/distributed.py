"""Distributed bookkeeping for torchrun: process group, rank-0 helpers, DDP / FSDP2 wrapping.

Under `torchrun --nproc_per_node=N` the same entry point runs N processes; RANK / WORLD_SIZE /
LOCAL_RANK come from the environment. Gradients are synchronised by PyTorch (DDP, or FSDP2's
`fully_shard` with --fsdp); nothing here moves tensors by hand except two small all-reduces of
counters. Without torchrun everything is a no-op on one process. Under FSDP, code that bypasses
model.forward (generate() during evaluation) runs inside `root_unsharded(model)`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanopali.devices import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """All-reduce a number (sum over ranks)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor summed over the ranks (a new tensor, outside autograd): the MoE routing counts."""
        tensor = tensor.detach().clone()
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device: str = "auto") -> Dist:
    """This process's place in the run; `device` ("auto", "cpu", "cuda", ...) is checked first (a UsageError
    for a GPU that is not there), and under torchrun each process takes the GPU of its local rank."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=resolved)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolved.type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device("cuda", local) if cuda else torch.device("cpu"))


def teardown() -> None:
    """Every rank past its last collective (rank 0 may still be plotting) before any tears gloo down: a rank that
    destroyed the group while its peer still used it was seen to abort at exit (SIGABRT, once in five runs
    of the FSDP contrastive test)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool, layers: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """DDP for several processes, FSDP2 (sharded parameters and optimizer state) with fsdp=True: each of `layers`
    (the model's transformer blocks) is sharded on its own, then the rest of the model."""
    if d.world == 1 and not fsdp:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def root_unsharded(model: torch.nn.Module):
    """Gather an FSDP2 root's own parameters for code that does not go through model.forward().

    fully_shard(model) all-gathers the root's parameters (embeddings, projector, final norms) in
    a hook on model.forward and leaves them sharded DTensors otherwise; generate() calls
    model.embed and model.decoder directly, so they must be gathered around it. Each sharded
    layer still gathers its own parameters in its forward, so every rank must run the same calls.
    A no-op without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()
