"""Sharded data parallelism for a student too large to hold whole in every process (FSDP2).

With `train.sharding: fsdp` (or an accelerate config whose `distributed_type` is FSDP)
and N > 1 training processes, `shard_student` applies torch's `fully_shard` to each
decoder layer and to the decoder: every parameter there becomes a DTensor cut into N
pieces along its first dimension, a process keeps one, and a layer's pieces are
all-gathered just before its forward and backward and freed after. The token embedding
stays whole in every process: the LM head shares it (tied weights), and `unisd.chunked`
applies the head outside the decoder's forward, where FSDP's hooks would not gather it.

FSDP reduce-scatters the gradients of sharded parameters: summed over processes, not
averaged (divide factor 1), because each micro-batch's loss is already divided by the
global accumulation k, as in the unsharded loop (`unisd.train`). Under LoRA that is all
that trains; under full fine-tuning the whole embedding trains too, and its gradient is
all-reduced with the unsharded loop's sum (`unisd.train._sum_gradients`). Gradient
clipping then needs the norm over shards and whole tensors together (`clip_grad_norm_`).

What the rest of the loop needs from a sharded model, each a no-op on whole tensors:
`full_state` (gathered, on every process: a collective) for checkpoints and outputs,
`copy_full_` to load a full tensor into a shard, `any_nonzero` (the teacher's base-model
test over shards), and `reshard` before the teacher swaps weights in place (the decoder,
FSDP's root, keeps its gathered parameters after a forward otherwise, and a swap would
write into pieces the next forward does not read).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_student(model: Any) -> None:
    """fully_shard each decoder layer, then the decoder (the root), the tied embedding
    left whole; gradients summed over processes."""
    decoder = model.get_decoder()
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder, ignored_params={model.get_input_embeddings().weight})
    for module in decoder.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered parameter, so each module holds its sharded pieces again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (all-gathered: every process must call), or `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of the whole tensors (a collective when any is sharded)."""
    return {n: full(t).detach().cpu().clone() for n, t in tensors.items()}


@torch.no_grad()
def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst ← src, for a whole `src`: into a shard, this process's piece of it (every
    process holds the same `src`, read from one file, so no communication)."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def any_nonzero(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any element of the (whole) tensors is non-zero, the same answer in every process."""
    tensors = list(tensors)
    local = any(bool((t.to_local() if isinstance(t, DTensor) else t).any()) for t in tensors)
    if not any(isinstance(t, DTensor) for t in tensors):
        return local
    device = next(t.to_local().device for t in tensors if isinstance(t, DTensor))
    flag = torch.tensor(int(local), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` over parameters some of which are shards:

        ‖g‖ = sqrt(Σ_shards ‖g_piece‖² summed over processes + Σ_whole ‖g‖²)

    (a whole parameter's gradient is the same in every process, so it counts once), then
    every gradient scaled by min(1, max_norm / (‖g‖ + 1e-6)), torch's rule. Returns ‖g‖."""
    grads = [p.grad for p in params if p.grad is not None]
    pieces = [g.to_local() for g in grads if isinstance(g, DTensor)]
    sharded = torch.stack([g.float().norm() ** 2 for g in pieces]).sum() if pieces else torch.zeros(())
    if pieces:
        dist.all_reduce(sharded)
    whole = sum((g.float().norm() ** 2 for g in grads if not isinstance(g, DTensor)), torch.zeros(()))
    norm = float((sharded.cpu() + whole.cpu()).sqrt())
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm
