"""Distributed training helpers: the LEGW global batch size, and what LARS needs under FSDP2/DTensor sharding.

DDP needs nothing from this module: its gradients are already all-reduced (averaged) before ``step()``, every rank
holds the whole parameters, and ``legw_fused.SGD`` / ``LARS`` compute identical steps on every rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``) makes every parameter a DTensor sharded along dim 0. The optimizers
run their kernels on the local shards; LARS needs each parameter's norms over the whole tensor, so the local sums
of squares of all sharded tensors travel in one buffer and one all-reduce per step per process group
(``sharded_norm_group``); replicated parameters keep their local norms (every rank holds all of them: summing them
over ranks would count them world-size times).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["any_dtensor", "global_batch_size", "is_dtensor", "local_tensor", "sharded_norm_group"]

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # torch built without distributed support: no DTensor can exist
    dist = None
    DTensor = None


def global_batch_size(per_rank_batch: int, group=None) -> int:
    """The batch size LEGW must be given: ``per_rank_batch`` times the number of ranks of ``group`` (the default
    process group when None) that each take a different slice of the data; ``per_rank_batch`` alone when
    torch.distributed is not initialized.

    ``LEGW(..., batch_size=global_batch_size(64))`` under ``torchrun --nproc_per_node=8`` schedules for 512."""
    if isinstance(per_rank_batch, bool) or not isinstance(per_rank_batch, int) or per_rank_batch <= 0:
        raise ValueError(f"global_batch_size: per_rank_batch must be an int > 0, got {per_rank_batch!r}")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return per_rank_batch
    return per_rank_batch * dist.get_world_size(group)


def is_dtensor(t) -> bool:
    # The type, not isinstance: nn.Parameter's metaclass makes isinstance a Python-level call, and step() asks this
    # of every parameter (a Parameter made from a DTensor has type DTensor).
    return DTensor is not None and issubclass(type(t), DTensor)


def any_dtensor(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor, by their few distinct types (step() asks this of every bucket)."""
    return DTensor is not None and any(issubclass(t, DTensor) for t in {type(x) for x in tensors})


def local_tensor(t: Tensor | None) -> Tensor | None:
    """The rank's own part of ``t`` (its local shard for a DTensor), which in-place kernels update; ``t`` itself
    otherwise."""
    return t.to_local() if is_dtensor(t) else t


def wrap_like(local: Tensor, like: Tensor) -> Tensor:
    """``local`` as a DTensor laid out like the DTensor ``like`` (for optimizer state made from local shards)."""
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def sharded_norm_group(p: Tensor):
    """The process group over which ``p``'s local sums of squares must be added to give its whole-tensor value,
    or None when the local tensor is the whole tensor (a plain tensor, or a DTensor replicated on every rank)."""
    if not is_dtensor(p):
        return None
    placements = p.placements
    if any(isinstance(pl, Partial) for pl in placements):
        raise ValueError(f"LARS: a parameter of shape {tuple(p.shape)} has a Partial placement; parameters must be "
                         f"sharded (Shard) or replicated (Replicate)")
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if not shard_dims:
        return None
    if len(shard_dims) > 1:
        raise NotImplementedError(f"LARS: a parameter of shape {tuple(p.shape)} is sharded over {len(shard_dims)} "
                                  f"mesh dimensions ({placements}); one sharded mesh dimension is supported")
    return p.device_mesh.get_group(shard_dims[0])


def all_reduce_sum_(flat: Tensor, group) -> None:
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
