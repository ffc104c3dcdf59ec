"""Global-batch InfoNCE under data parallelism: all-gather embeddings, gradients flowing back to each local shard."""

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """All-gather ``(n_rank, p)`` rows (sizes may differ per rank) -> ``(sum n, p)``.

    Backward sums the gradient of the gathered tensor over ranks and returns this rank's slice: every rank computes
    the same global loss, and after DDP averages the parameter gradients the update equals the single-process one
    on the global batch.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = torch.tensor([local.shape[0]], device=local.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        all_sizes = [int(s) for s in all_sizes]
        padded = local.new_zeros((max(all_sizes), *local.shape[1:]))
        padded[:local.shape[0]] = local
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.size = sum(all_sizes[:rank]), local.shape[0]
        return torch.cat([c[:n] for c, n in zip(chunks, all_sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.size]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """``(n, p)`` -> ``(N_global, p)`` in rank order; identity outside an initialised multi-process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)
