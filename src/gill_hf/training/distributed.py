"""Global-batch InfoNCE under data parallelism: all-gather embeddings, gradients flowing back to each local shard."""

import contextlib

import torch
import torch.distributed as dist
from torch import nn

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
    return _trainable_outside_adapter(model, "FSDP")


def _trainable_outside_adapter(model, sharding: str) -> str | None:
    outside = [name for name, param in model.named_parameters()
               if param.requires_grad and not name.startswith("adapter.")]
    if outside:
        return (f"under {sharding} only the adapter may train, but {len(outside)} other tensors require grad (e.g. "
                f"{outside[0]}; LoRA on the LLM is not supported with {sharding} yet)")
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


DEEPSPEED_NO_RESUME = ("resuming under DeepSpeed is not supported yet (its engine checkpoints would be unpickled and "
                       "must hold every frozen tensor); checkpoints' model.safetensors load with from_pretrained")


def deepspeed_plan_problem(model, deepspeed_config: dict, args) -> str | None:
    """Why GILL cannot train under ``deepspeed_config`` (the DeepSpeed config dict) with ``args``
    (``TrainingArguments``), or None.

    GILL partitions the frozen backbones with ZeRO-3 (``zero_optimization.stage: 3``) and trains the adapter
    only (LoRA on the LLM is not supported under DeepSpeed); it does not resume DeepSpeed checkpoints, so neither
    ``load_best_model_at_end``."""
    stage = deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        return (f"GILL runs DeepSpeed as ZeRO-3 (the frozen LLM partitioned): set zero_optimization.stage to 3 in "
                f"the DeepSpeed config (got {stage}); see examples/accelerate/deepspeed_zero3.json")
    if args.load_best_model_at_end:
        return f"load_best_model_at_end=True: {DEEPSPEED_NO_RESUME}"
    return _trainable_outside_adapter(model, "DeepSpeed")


def prepare_for_zero3(model, deepspeed_config: dict, args) -> None:
    """Make ``model`` (a GILL model) trainable under DeepSpeed ZeRO-3; call before the engine is built.

    DeepSpeed cannot broadcast or partition a 0-dim tensor, so ``adapter.logit_scale`` becomes shape ``(1,)``
    while its state dict keeps the saved shape ``()`` (state-dict hooks reshape on save and load). The adapter's
    own tensors (E_img, E_out, logit_scale), which GILL's forward reads outside any submodule's forward, are
    registered as external parameters of the model, so ZeRO-3 gathers them for each forward (DeepSpeed 0.19 would
    also register them on first access; registering them up front is its documented way).
    Raises ``ValueError`` with :func:`deepspeed_plan_problem`'s reason."""
    import deepspeed

    problem = deepspeed_plan_problem(model, deepspeed_config, args)
    if problem:
        raise ValueError(problem)
    adapter = model.adapter
    if adapter.logit_scale.dim() == 0:
        scale = adapter.logit_scale
        adapter.logit_scale = nn.Parameter(scale.detach().reshape(1), requires_grad=scale.requires_grad)
        adapter.register_state_dict_post_hook(_scalar_logit_scale)
        adapter.register_load_state_dict_pre_hook(_vector_logit_scale)
    for param in adapter.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(model, param)


def _scalar_logit_scale(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].numel() == 1:  # not a ZeRO-3 placeholder (empty while partitioned)
        state_dict[key] = state_dict[key].reshape(())


def _vector_logit_scale(module, state_dict, prefix, *args) -> None:
    key = prefix + "logit_scale"
    if key in state_dict and state_dict[key].numel() == 1:
        state_dict[key] = state_dict[key].reshape(1)


def gathered(params, modifier_rank: int | None = None):
    """Context in which ZeRO-3-partitioned ``params`` are whole (``deepspeed.zero.GatheredParameters``; with
    ``modifier_rank`` that rank's in-place changes are kept everywhere); a no-op for plain tensors."""
    params = [p for p in params if p is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def renormalize_img_embeddings(model) -> None:
    """``model.renormalize_img_embeddings()``, also when ZeRO-3 partitions its tensors: then the [IMG] rows and the
    LLM tables are gathered, changed on rank 0 and re-partitioned, and the optimizer's fp32 master copies of the
    rows are set to the new values (else the next step would start from the old ones)."""
    rows = [p for p in (model.adapter.img_embeddings, model.adapter.img_output_embeddings) if p is not None]
    llm = model.language_model
    tables = [m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None]
    if not any(hasattr(p, "ds_id") for p in rows + tables):
        model.renormalize_img_embeddings()
        return
    from deepspeed.utils import safe_set_full_fp32_param

    with gathered(rows + tables, modifier_rank=0):
        model.renormalize_img_embeddings()
        new = [row.detach().clone() for row in rows]
    for row, value in zip(rows, new):
        if row.requires_grad:
            safe_set_full_fp32_param(row, value)


