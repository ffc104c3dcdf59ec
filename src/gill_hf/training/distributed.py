"""Global-batch InfoNCE under data parallelism: all-gather embeddings, gradients flowing back to each local shard."""

import torch
import torch.distributed as dist

from ..modeling_gill import GILLAdapter


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

DEEPSPEED_UNSUPPORTED = (
    "GILLTrainer does not run under DeepSpeed: its engine cannot broadcast the adapter's 0-dim logit_scale, and "
    "ZeRO-3 would partition the adapter tensors that GILL's forward reads outside their module (E_img, E_out, "
    "logit_scale). Shard the frozen LLM with FSDP2 instead: accelerate launch --config_file "
    "examples/accelerate/fsdp2.yaml ...")


def fsdp_plan_problem(model, fsdp_plugin) -> str | None:
    """Why GILL cannot train under ``fsdp_plugin`` (accelerate's FSDP settings), or None.

    GILL shards the frozen backbones with FSDP2 and keeps its adapter whole on every process, so it needs
    ``fsdp_version: 2``, every trainable tensor inside ``model.adapter`` (LoRA on the LLM is not supported under
    FSDP) and no ignored modules of the user's own (an earlier GILLTrainer's adapter is replaced)."""
    if fsdp_plugin.fsdp_version != 2:
        return (f"GILL shards the frozen LLM with FSDP2: set fsdp_version: 2 in the accelerate config (got "
                f"{fsdp_plugin.fsdp_version}); see examples/accelerate/fsdp2.yaml")
    if fsdp_plugin.ignored_modules is not None and not all(isinstance(m, GILLAdapter)
                                                           for m in fsdp_plugin.ignored_modules):
        return ("fsdp_ignored_modules is set by GILLTrainer (the adapter stays unsharded); remove it from the "
                "accelerate config")
    outside = [name for name, param in model.named_parameters()
               if param.requires_grad and not name.startswith("adapter.")]
    if outside:
        return (f"under FSDP only the adapter may train, but {len(outside)} other tensors require grad (e.g. "
                f"{outside[0]}; LoRA on the LLM is not supported with FSDP yet)")
    return None


def replicate_adapter_under_fsdp(model, fsdp_plugin, sync_gradients) -> None:
    """Keep ``model.adapter`` whole on every process while accelerate's FSDP2 shards the frozen backbones.

    Call before accelerate prepares the model: the adapter becomes an ignored module of ``fsdp_plugin`` (FSDP
    does not shard or reduce it), rank 0's adapter is broadcast, and each trainable adapter tensor's accumulated
    gradient is averaged over the processes when ``sync_gradients()`` says the step syncs (as DDP does). The
    optimizer then holds only plain, replicated tensors: checkpoints need no gather and never touch the LLM.
    Raises ``ValueError`` with :func:`fsdp_plan_problem`'s reason."""
    problem = fsdp_plan_problem(model, fsdp_plugin)
    if problem:
        raise ValueError(problem)
    fsdp_plugin.ignored_modules = [model.adapter]
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        if sync_gradients():
            dist.all_reduce(param.grad)  # a sum: gloo has no average
            param.grad.div_(world)

    for param in model.adapter.parameters():
        with torch.no_grad():
            dist.broadcast(param.data, src=0)
        if param.requires_grad and not getattr(param, "_gill_grad_average", False):
            param.register_post_accumulate_grad_hook(average)
            param._gill_grad_average = True
