"""Convert MiniGPT-5's released Lightning checkpoints (``stage1_cc3m.ckpt``, ``stage2_vist.ckpt`` /
``stage2_mmdialog.ckpt``) into a gill_hf model folder.

What the files hold (MiniGPT-5's ``on_save_checkpoint`` keeps only trainable tensors; see
``shared/reference/minigpt5-as-coded.md`` sec. 4):

* stage 1: ``model.llama_model.model.embed_tokens.weight`` and ``model.llama_model.lm_head.weight`` (the full
  ``(V + 9, e)`` matrices: Vicuna's V rows, then the 8 vokens ``[IMG0..7]`` and ``<ImageHere>``, in that order),
  ``fc.{0,2}.*`` (Linear-GELU-Linear, e -> D -> D), ``llm_to_t2i_mapping.*`` (``nn.Transformer``, d_model D = the
  diffusion text width, 8 heads, 4 + 4 layers, ffn 4D, norm_first) and ``t2i_decoder_prompt`` ``(1, 77, D)``.
* stage 2 (peft 0.10 LoRA, ``modules_to_save=[lm_head, embed_tokens]``): under
  ``model.llama_model.base_model.model.``, ``model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.default.weight``
  (r = 8), ``model.embed_tokens.modules_to_save.default.weight`` and ``lm_head.modules_to_save.default.weight``
  (full matrices again), plus ``llm_to_t2i_mapping.*``. ``fc`` and the queries are frozen in stage 2 and absent,
  so a stage-2 conversion needs the stage-1 file too.

Mapping: the voken rows of the embedding / LM-head matrices -> ``adapter.img_embeddings`` /
``adapter.img_output_embeddings`` (stage 2's ``modules_to_save`` copies win over stage 1's), ``fc`` ->
``adapter.mapper.in_proj`` (``mapper_input_proj="mlp"``), ``llm_to_t2i_mapping`` -> ``adapter.mapper.transformer``
(stage 2's wins), ``t2i_decoder_prompt`` -> ``adapter.mapper.queries``; LoRA A/B -> a peft adapter in ``lora/``.
The ``<ImageHere>`` rows are read and checked but not kept: gill_hf replaces ``<|image|>`` by the visual prefix
and masks its logit. The config carries MiniGPT-5's switches (``minigpt5_overrides``: voken features from the
predicting positions, no input-embedding add, loss weights 0.01 / 1 / 0.1, CFG 0.1, Min-SNR 5; LoRA r 8, alpha 16,
dropout 0.05 on q/v for stage 2) and the processor defaults to the ``minigpt5`` chat template.

The input side is MiniGPT-4's (EVA ViT-g + BLIP-2 Q-Former, 32 queries, then a frozen ``llama_proj`` Linear(768 ->
e)), which the MiniGPT-5 files do not hold. Give a BLIP-2 checkpoint as the vision backbone (``visual_encoder=
"blip2_qformer"``; transformers' BLIP-2 uses its own EVA-style ViT-g weights, e.g. ``Salesforce/blip2-flan-t5-xxl``,
the family MiniGPT-4 loads) and MiniGPT-4's aligned checkpoint (``prerained_minigpt4_7b.pth``, ``{"model":
{"llama_proj.weight", "llama_proj.bias"}}``) as ``minigpt4``: ``llama_proj`` becomes ``adapter.w_cap`` (linear,
frozen: ``train_visual_projection=False``). With a CLIP vision backbone instead, ``w_cap`` is freshly initialised
(image *inputs* are then untrained; generation from text is MiniGPT-5's).

Not in MiniGPT-5, so filled in: ``w_t2i``, ``w_i2t`` and ``logit_scale`` as a fresh model initialises them (seed 0;
MiniGPT-5 has no retrieval, so retrieval scores mean nothing) and a decision head that always generates.

Uncertain (the released files were not available offline; the layout follows the code): the exact stage-2 prefix
(``base_model.model.`` as peft 0.10 names it), whether ``optimizer_states`` were stripped (they are skipped either
way), and whether ``embed_tokens`` rows other than the 9 new ones drifted (AdamW's weight decay touches all rows;
the converted model uses the backbone's own rows for the old vocabulary). MiniGPT-5's tokenizer also sets BOS to
``</s>``; the converted processor keeps the backbone tokenizer's BOS.

Checkpoints are pickles: they are read with :func:`gill_hf.safe_pickle.load_tensor_checkpoint`, which imports and
calls nothing beyond torch's tensor rebuilders (``hyper_parameters`` objects, callbacks... are skipped and named in
the summary). Every key and shape is checked against the chosen backbones before anything is written; the folder
is written with :func:`gill_hf.atomic.atomic_folder`.
"""

import os
from collections import Counter

import torch

from .configuration_gill import GILLConfig
from .visual_encoders import FOLDER_MODEL_TYPES, vision_fields_from_pretrained
from .modeling_gill import ADAPTER_PREFIX, ADAPTER_WEIGHTS_NAME, LORA_SUBFOLDER, GILLAdapter

NUM_VOKENS = 8
NUM_NEW_TOKENS = NUM_VOKENS + 1  # [IMG0..7] then <ImageHere>
LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS = 8, 16, 0.05, ("q_proj", "v_proj")
MAPPER_HEADS, MAPPER_LAYERS, NUM_QUERIES = 8, 4, 77

EMBED_1 = "model.llama_model.model.embed_tokens.weight"
HEAD_1 = "model.llama_model.lm_head.weight"
PEFT_PREFIX = "model.llama_model.base_model.model."
EMBED_2 = PEFT_PREFIX + "model.embed_tokens.modules_to_save.default.weight"
HEAD_2 = PEFT_PREFIX + "lm_head.modules_to_save.default.weight"
LORA_KEY = PEFT_PREFIX + "model.layers.{layer}.self_attn.{module}.lora_{part}.default.weight"
FC, MAPPING, QUERIES = "fc.", "llm_to_t2i_mapping.", "t2i_decoder_prompt"
LLAMA_PROJ = ("llama_proj.weight", "llama_proj.bias")  # MiniGPT-4's aligned checkpoint, under "model"
_LISTED = 12  # keys named per kind of mismatch


# ---------------------------------------------------------------------------------------------- config
def visual_encoder_of(vision_model: str) -> str:
    """``"blip2_qformer"`` for a BLIP-2 checkpoint (MiniGPT-4's input side), else ``"clip_pooled"``."""
    from transformers import PreTrainedConfig

    model_type = PreTrainedConfig.get_config_dict(vision_model)[0].get("model_type")
    return "blip2_qformer" if model_type in FOLDER_MODEL_TYPES["blip2_qformer"] else "clip_pooled"


def minigpt5_config(text_model: str, vision_model: str, diffusion_model: str, tokenizer, stage2: bool) -> GILLConfig:
    """GILLConfig of MiniGPT-5 on these backbones (configs only, no weights): 8 vokens, the mapper at the
    diffusion text width, the recipe's switches, a frozen linear W_cap for a BLIP-2 vision backbone; ``tokenizer``
    (GILL tokens added) gives the token ids."""
    from transformers import AutoConfig

    from .diffusion_layouts import layout_of_folder
    from .token_ids import add_gill_tokens
    from .training.trainer import minigpt5_overrides

    text_config = AutoConfig.from_pretrained(text_model)
    if getattr(text_config, "tie_word_embeddings", False):
        raise ValueError(f"{text_model}: MiniGPT-5's LLM has a separate lm_head (LLaMA / Vicuna); this one ties its "
                         f"input and output embeddings")
    layout = layout_of_folder(diffusion_model)
    if layout.pooled_dim is not None:
        raise ValueError(f"{diffusion_model}: MiniGPT-5 conditions a {layout.family} model with a pooled vector it "
                         f"does not predict; use a Stable Diffusion 1.x / 2.x folder (MiniGPT-5: SD 2.1 base)")
    image_id, img_ids = add_gill_tokens(tokenizer, NUM_VOKENS)
    width = layout.sequence_dim
    encoder = visual_encoder_of(vision_model)
    vision = vision_fields_from_pretrained(encoder, vision_model)
    if encoder == "blip2_qformer":
        vision.update(visual_projection="linear", train_visual_projection=False)
    values = dict(minigpt5_overrides("interleaved" if stage2 else "align"), visual_encoder=encoder, **vision,
                  use_lora=stage2, lora_r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                  lora_target_modules=list(LORA_TARGETS))
    return GILLConfig(
        text_config=text_config.to_dict(),
        text_model_name_or_path=text_model, vision_model_name_or_path=vision_model,
        diffusion_model_name_or_path=diffusion_model, diffusion_layout=layout.family, gen_emb_dim=width,
        num_img_tokens=NUM_VOKENS, img_token_ids=img_ids, image_token_id=image_id, hidden_layer=-1,
        mapper_type="gill_mapper", mapper_hidden_dim=width, mapper_num_heads=MAPPER_HEADS,
        mapper_encoder_layers=MAPPER_LAYERS, mapper_decoder_layers=MAPPER_LAYERS, mapper_ffn_dim=4 * width,
        mapper_dropout=0.0, num_gen_queries=NUM_QUERIES, **values)


# ---------------------------------------------------------------------------------------------- key layouts
def _meta_adapter(config: GILLConfig) -> GILLAdapter:
    with torch.device("meta"):
        return GILLAdapter(config)


def _lora_shapes(config: GILLConfig) -> dict[str, tuple[int, ...]]:
    """LoRA A ``(r, hidden)`` / B ``(out, r)`` of q_proj and v_proj in every layer (LLaMA attention widths)."""
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    outs = {"q_proj": tc.num_attention_heads * head_dim,
            "v_proj": getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads}
    outs["v_proj"] *= head_dim
    shapes = {}
    for layer in range(tc.num_hidden_layers):
        for module, out in outs.items():
            shapes[LORA_KEY.format(layer=layer, module=module, part="A")] = (LORA_RANK, tc.hidden_size)
            shapes[LORA_KEY.format(layer=layer, module=module, part="B")] = (out, LORA_RANK)
    return shapes


def expected_keys(config: GILLConfig, stage: int) -> dict[str, tuple[int, ...]]:
    """Every key a MiniGPT-5 stage-1 / stage-2 checkpoint holds on ``config``'s backbones, with its shape."""
    mapper = _meta_adapter(config).mapper
    rows = config.text_config.vocab_size + NUM_NEW_TOKENS
    embed, out = (rows, config.llm_embed_dim), (rows, config.llm_output_dim)
    shapes = {MAPPING + k: tuple(v.shape) for k, v in mapper.transformer.state_dict().items()}
    if stage == 1:
        shapes.update({FC + k: tuple(v.shape) for k, v in mapper.in_proj.state_dict().items()})
        shapes.update({QUERIES: tuple(mapper.queries.shape), EMBED_1: embed, HEAD_1: out})
    else:
        shapes.update(_lora_shapes(config))
        shapes.update({EMBED_2: embed, HEAD_2: out})
    return shapes


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def key_problems(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """The missing keys, unexpected keys and wrong shapes of ``state_dict`` (empty when it matches)."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)}, expected {expected[k]}" for k in sorted(set(expected) & set(state_dict))
             if tuple(state_dict[k].shape) != expected[k]]
    return [f"{label} ({len(items)}): {_listed(items)}" for label, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]


def check_stage(state_dict: dict[str, torch.Tensor], config: GILLConfig, stage: int, source: str):
    """Raise one ``ValueError`` listing every mismatch when ``state_dict`` is not a stage-``stage`` checkpoint for
    ``config``'s backbones (naming the other stage when the file is that one)."""
    problems = key_problems(state_dict, expected_keys(config, stage))
    if not problems:
        return
    other = 3 - stage
    if not key_problems(state_dict, expected_keys(config, other)):
        hint = f" (it is a stage-{other} checkpoint: pass it as --stage{other})"
    elif not set(state_dict) & (set(expected_keys(config, 1)) | set(expected_keys(config, 2))):
        hint = " (its keys match neither MiniGPT-5 stage)"
    else:
        hint = (f" (widths expected from the backbones: LLM vocab {config.text_config.vocab_size} + "
                f"{NUM_NEW_TOKENS} new rows, LLM width {config.llm_embed_dim}, mapper width = diffusion text width "
                f"{config.gen_emb_dim}, {config.text_config.num_hidden_layers} LLM layers)")
    raise ValueError(f"{source} is not a MiniGPT-5 stage-{stage} checkpoint for these backbones{hint}: "
                     + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Lightning ``.ckpt`` -> (its ``state_dict`` of tensors, the names of the globals skipped while reading).

    Only ``state_dict`` is used; other entries (``hyper_parameters``, ``optimizer_states``, ``callbacks``...) may
    hold anything and are never needed. A key that is not a str or a value that is not a tensor inside
    ``state_dict`` is an error."""
    from .safe_pickle import SkippedObject, load_tensor_checkpoint

    path = os.fspath(path)
    data, skipped = load_tensor_checkpoint(path)
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} has no 'state_dict' dict; expected a PyTorch Lightning checkpoint "
                         f"(entries: {sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__})")
    bad = [f"{k} ({v!r})" if isinstance(v, SkippedObject) else f"{k} ({type(v).__name__})"
           for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors or not under str keys: {_listed(bad)}")
    return dict(state), skipped


def read_llama_proj(path: str | os.PathLike, config: GILLConfig) -> dict[str, torch.Tensor]:
    """MiniGPT-4's aligned checkpoint -> ``{"adapter.w_cap.weight", "adapter.w_cap.bias"}``, shapes checked against
    the Q-Former width and the LLM width (``{"model": {...}}`` as MiniGPT-4 saves it, or the bare dict)."""
    from .safe_pickle import load_tensor_checkpoint

    path = os.fspath(path)
    data, _ = load_tensor_checkpoint(path)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected MiniGPT-4's checkpoint, a dict with 'model': {{llama_proj.*}}")
    expected = {LLAMA_PROJ[0]: (config.llm_embed_dim, config.vision_dim), LLAMA_PROJ[1]: (config.llm_embed_dim,)}
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    problems = key_problems({k: v for k, v in state.items() if k not in bad}, expected)
    if bad:
        problems.append(f"not tensors or not str keys: {_listed([str(k) for k in bad])}")
    if problems:
        raise ValueError(f"{path} is not MiniGPT-4's llama_proj for these backbones (Q-Former width "
                         f"{config.vision_dim} -> LLM width {config.llm_embed_dim}): " + "; ".join(problems))
    return {f"{ADAPTER_PREFIX}w_cap.weight": state[LLAMA_PROJ[0]].contiguous(),
            f"{ADAPTER_PREFIX}w_cap.bias": state[LLAMA_PROJ[1]].contiguous()}


# ---------------------------------------------------------------------------------------------- converting
def _fresh_tensors(config: GILLConfig) -> dict[str, torch.Tensor]:
    """The adapter tensors MiniGPT-5 has no counterpart for: ``w_cap``, ``w_t2i``, ``w_i2t`` as a fresh model
    initialises them (seed 0), ``logit_scale`` at its init, a decision head that always generates."""
    from .convert_original import always_generate_head

    adapter, out = _meta_adapter(config), {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name in ("w_cap", "w_t2i", "w_i2t"):
            layer = getattr(adapter, name).to_empty(device="cpu")
            layer.reset_parameters()
            out.update({f"{ADAPTER_PREFIX}{name}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    out[f"{ADAPTER_PREFIX}logit_scale"] = torch.tensor(config.logit_scale_init)
    out.update(always_generate_head(config))
    return out


def convert_state_dicts(stage1: dict[str, torch.Tensor], config: GILLConfig,
                        stage2: dict[str, torch.Tensor] | None = None,
                        llama_proj: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Checked MiniGPT-5 tensors (+ :func:`read_llama_proj`'s W_cap) -> (``adapter_state_dict()`` tensors, peft
    LoRA tensors or {}); dtypes kept."""
    vocab = config.text_config.vocab_size
    vokens = slice(vocab, vocab + NUM_VOKENS)
    embed, head = (stage2[EMBED_2], stage2[HEAD_2]) if stage2 is not None else (stage1[EMBED_1], stage1[HEAD_1])
    mapping = stage2 if stage2 is not None else stage1
    weights = {**_fresh_tensors(config), **(llama_proj or {})}
    weights[f"{ADAPTER_PREFIX}img_embeddings"] = embed[vokens].clone()
    weights[f"{ADAPTER_PREFIX}img_output_embeddings"] = head[vokens].clone()
    weights[f"{ADAPTER_PREFIX}mapper.queries"] = stage1[QUERIES].contiguous()
    for source, target, state in ((FC, "mapper.in_proj.", stage1), (MAPPING, "mapper.transformer.", mapping)):
        weights.update({ADAPTER_PREFIX + target + k[len(source):]: v.contiguous() for k, v in state.items()
                        if k.startswith(source)})
    lora = {}
    if stage2 is not None:
        lora = {"base_model.model." + k[len(PEFT_PREFIX):].replace(".default.weight", ".weight"): v.contiguous()
                for k, v in stage2.items() if ".lora_" in k}
    expected = {ADAPTER_PREFIX + k for k in _meta_adapter(config).state_dict()}
    if set(weights) != expected:  # a programming error, not bad input
        raise RuntimeError(f"converted keys differ from the adapter's: {sorted(set(weights) ^ expected)}")
    return weights, lora


def _save_lora(folder: str, config: GILLConfig, tensors: dict[str, torch.Tensor]):
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the config's LLM."""
    import safetensors.torch
    from peft import LoraConfig

    os.makedirs(folder)
    LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(LORA_TARGETS),
               bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=config.text_model_name_or_path).save_pretrained(folder)
    safetensors.torch.save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def convert_minigpt5(stage1: str | os.PathLike, out_dir: str | os.PathLike, stage2: str | os.PathLike | None = None,
                     *, text_model: str, vision_model: str, diffusion_model: str,
                     minigpt4: str | os.PathLike | None = None) -> dict:
    """Write a gill_hf model folder from MiniGPT-5's checkpoints; returns a summary (tensors, dtypes, skipped).

    Args:
        stage1: ``stage1_cc3m.ckpt`` (always needed: it alone holds ``fc`` and the queries).
        out_dir: a new (or empty) folder.
        stage2: ``stage2_vist.ckpt`` / ``stage2_mmdialog.ckpt``; adds the LoRA adapter and replaces the voken rows
            and the mapper transformer.
        text_model, vision_model, diffusion_model: the backbones (Hub id or path): Vicuna-7B v0 (MiniGPT-5 uses
            ``Vision-CAIR/vicuna-7b``), a BLIP-2 checkpoint (MiniGPT-4's input side; needs ``minigpt4``) or a CLIP
            vision model, and SD 2.1 base (``stabilityai/stable-diffusion-2-1-base``). Their configs fix every
            expected width; their tokenizer and image processor are saved as the processor.
        minigpt4: MiniGPT-4's ``prerained_minigpt4_7b.pth`` (its ``llama_proj``); required with a BLIP-2 vision
            backbone, refused with a CLIP one.
    """
    from .atomic import atomic_folder
    from .processing_gill import GILLProcessor

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new output folder")
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_model)
    config = minigpt5_config(text_model, vision_model, diffusion_model, tokenizer, stage2 is not None)
    if (minigpt4 is not None) != (config.visual_encoder == "blip2_qformer"):
        raise ValueError(f"minigpt4 (MiniGPT-4's llama_proj) goes with a BLIP-2 vision backbone and only with one; "
                         f"got {'no ' if minigpt4 is None else ''}minigpt4 with {vision_model} "
                         f"(visual_encoder {config.visual_encoder!r})")
    llama_proj = read_llama_proj(minigpt4, config) if minigpt4 is not None else None
    state1, skipped = read_checkpoint(stage1)
    check_stage(state1, config, 1, os.fspath(stage1))
    state2 = None
    if stage2 is not None:
        state2, skipped2 = read_checkpoint(stage2)
        check_stage(state2, config, 2, os.fspath(stage2))
        skipped = sorted(set(skipped) | set(skipped2))
    weights, lora = convert_state_dicts(state1, config, state2, llama_proj)
    processor = GILLProcessor(AutoImageProcessor.from_pretrained(vision_model, backend="pil"), tokenizer,
                              num_visual_tokens=config.num_visual_tokens, num_img_tokens=NUM_VOKENS,
                              chat_template="minigpt5",
                              context_length=getattr(config.text_config, "max_position_embeddings", None))

    import safetensors.torch

    with atomic_folder(out_dir) as staging:
        config.save_pretrained(staging)
        safetensors.torch.save_file(weights, os.path.join(staging, ADAPTER_WEIGHTS_NAME),
                                    metadata={"format": "pt", "converted_from": "MiniGPT-5"})
        processor.save_pretrained(staging)
        if lora:
            _save_lora(os.path.join(staging, LORA_SUBFOLDER), config, lora)
    dtypes = Counter()
    for tensor in [*weights.values(), *lora.values()]:
        dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return {"out_dir": out_dir, "stages": [1, 2] if stage2 is not None else [1],
            "visual_encoder": config.visual_encoder, "adapter_tensors": len(weights),
            "lora_tensors": len(lora), "parameters_by_dtype": dict(dtypes), "skipped_globals": skipped,
            "img_token_ids": list(config.img_token_ids), "image_token_id": config.image_token_id,
            "files": sorted(os.path.relpath(os.path.join(root, f), out_dir)
                            for root, _, files in os.walk(out_dir) for f in files)}
