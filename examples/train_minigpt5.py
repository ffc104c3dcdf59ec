"""MiniGPT-5's recipe end to end: stage 1 on CC3M-format pairs, then stage 2 on VIST stories and MMDialog dialogues.

Stage 1 ("align"): captions -> [IMG0..7] (text loss x0.01), the mapper's output against the caption's diffusion text
features (MSE x0.1) and the latent-diffusion loss through the frozen UNet (x1, Min-SNR 5), CFG dropout 0.1 of the
voken features, mapper lr x10. Stage 2 ("interleaved"): LoRA (r 8, alpha 16, q/v) on the LLM, MiniGPT-5's prompts
(``prompt_format="minigpt5"``: VIST's three tasks, every MMDialog turn in both roles), text + LDM losses only; the
mapper's input MLP and queries are frozen.

    # tiny random backbones and toy data (CPU, seconds):
    python examples/train_minigpt5.py --tiny /tmp/gill-tiny --output-dir /tmp/minigpt5 --cpu
    # real run (MiniGPT-5: Vicuna-7B v0, SD 2.1 base; targets from `gill-hf precompute-targets`):
    torchrun --nproc_per_node 4 examples/train_minigpt5.py --cc3m cc3m.tsv --targets cc3m_targets \\
        --vist vist/train_cleaned.json --vist-images vist --mmdialog mmdialog/train.txt --output-dir runs/minigpt5 \\
        --stage1-steps 20000 --stage2-steps 20000

Writes ``<output-dir>/stage1`` and ``<output-dir>/stage2``; both load with
``GILLForConditionalGeneration.from_pretrained`` (stage 2 with its LoRA adapter in ``lora/``). Not reproduced:
MiniGPT-5's instruction-format duplicate of every 100th CC3M caption and its caption clean-up.
"""

import argparse
import json
import os

import torch
from PIL import Image
from torch.utils.data import ConcatDataset

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.training import (CaptionImageDataset, DiffusionTextEncoder, GILLForInterleavedTraining,
                              InterleavedDataCollator, LatentDiffusionLoss, TargetStore, VISTTaskDataset, apply_lora,
                              minigpt5_overrides, precompute_targets, set_training_fields, train_gill)
from gill_hf.training.mmdialog import MMDialogDataset

COLOURS = ("red", "blue", "green", "yellow", "purple", "white")


def tiny_data(root: str) -> dict:
    """Tiny backbones and toy CC3M / VIST / MMDialog files under ``root`` (built once)."""
    backbones = build_tiny_backbones(os.path.join(root, "backbones"))
    data = os.path.join(root, "minigpt5-data")
    os.makedirs(data, exist_ok=True)
    for colour in COLOURS:
        Image.new("RGB", (32, 32), colour).save(os.path.join(data, f"{colour}.jpg"))
    with open(os.path.join(data, "cc3m.tsv"), "w") as f:
        f.write("caption\timage_path\n" + "".join(f"a {c} square\t{c}.jpg\n" for c in COLOURS[:4]))
    story = [{"caption": f"then it turned {c}", "image_id": c, "sequence_index": i} for i, c in enumerate(COLOURS[:3])]
    with open(os.path.join(data, "vist_cleaned.json"), "w") as f:
        json.dump({"story1": story}, f)
    turns = [{"turn": [{"__TEXT__": "show me something"}]}, {"turn": [{"__TEXT__": "here"}, {"__MEDIA__": "red"}]},
             {"turn": [{"__TEXT__": "and now blue?"}]}, {"turn": [{"__TEXT__": "sure"}, {"__MEDIA__": "blue"}]}]
    with open(os.path.join(data, "mmdialog.txt"), "w") as f:
        f.write(json.dumps({"conversation_id": 1, "conversation": turns}) + "\n")
    targets = os.path.join(data, "targets")
    captions = CaptionImageDataset.from_tsv(os.path.join(data, "cc3m.tsv"), image_column="image_path").captions
    precompute_targets(captions, targets, DiffusionTextEncoder(backbones["sd"]), dtype="float32", progress=False)
    return {"text": backbones["llama"], "vision": backbones["clip"], "diffusion": backbones["sd"],
            "cc3m": os.path.join(data, "cc3m.tsv"), "targets": targets,
            "vist": os.path.join(data, "vist_cleaned.json"), "mmdialog": os.path.join(data, "mmdialog.txt"),
            "mapper": dict(mapper_encoder_layers=2, mapper_decoder_layers=2)}


def mapper_widths(diffusion_model: str) -> dict:
    """MiniGPT-5's mapper: d_model = the diffusion text width D, 8 heads, ffn 4D, 4 + 4 layers, no output linear."""
    from gill_hf.diffusion_layouts import layout_of_folder

    width = layout_of_folder(diffusion_model).sequence_dim
    return dict(mapper_hidden_dim=width, mapper_num_heads=8, mapper_ffn_dim=4 * width, mapper_encoder_layers=4,
                mapper_decoder_layers=4)


def stage1(paths: dict, args, out: str, ldm: LatentDiffusionLoss):
    """Align the vokens to the diffusion model on caption-image pairs; saves ``out``."""
    torch.manual_seed(0)  # identical initial adapters on every process
    model = GILLForConditionalGeneration.from_backbones(
        paths["text"], paths["vision"], paths["diffusion"], **{**mapper_widths(paths["diffusion"]),
                                                               **paths.get("mapper", {})},
        **minigpt5_overrides("align"))
    dataset = CaptionImageDataset.from_tsv(paths["cc3m"], args.cc3m_images, image_column="image_path")
    trainer = train_gill(model, dataset, out, targets=TargetStore(paths["targets"]) if paths["targets"] else None,
                         ldm_loss=ldm, mapper_lr_mult=10.0, max_steps=args.stage1_steps,
                         per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                         logging_steps=1, seed=0, disable_tqdm=True, use_cpu=args.cpu)
    trainer.train()
    trainer.save_model()


def stage2(paths: dict, args, stage1_dir: str, out: str, ldm: LatentDiffusionLoss):
    """LoRA + interleaved generation on VIST and / or MMDialog in MiniGPT-5's prompt format; saves ``out``."""
    model = GILLForInterleavedTraining.from_pretrained(stage1_dir).train()
    set_training_fields(model.config, **minigpt5_overrides("interleaved"))
    apply_lora(model)  # r 8, alpha 16, dropout 0.05 on q_proj / v_proj
    parts = []
    if paths["vist"]:
        parts.append(VISTTaskDataset.from_json(paths["vist"], args.vist_images))
    if paths["mmdialog"]:
        parts.append(MMDialogDataset.from_jsonl(paths["mmdialog"], args.mmdialog_images,
                                                tokenizer=model.processor.tokenizer, max_tokens=args.max_turn_tokens))
    collator = InterleavedDataCollator(model.processor, max_length=args.max_length, ldm_image_size=ldm.image_size,
                                       prompt_format="minigpt5")
    trainer = train_gill(model, ConcatDataset(parts), out, data_collator=collator, ldm_loss=ldm,
                         max_steps=args.stage2_steps, per_device_train_batch_size=args.batch_size,
                         learning_rate=args.learning_rate, logging_steps=1, seed=0, disable_tqdm=True,
                         use_cpu=args.cpu)
    trainer.train()
    trainer.save_model()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", metavar="DIR", help="tiny random backbones and toy data under DIR")
    parser.add_argument("--text-model", help="default: Vision-CAIR/vicuna-7b")
    parser.add_argument("--vision-model", help="default: openai/clip-vit-large-patch14")
    parser.add_argument("--diffusion-model", help="default: stabilityai/stable-diffusion-2-1-base")
    parser.add_argument("--cc3m", help="stage 1: caption<TAB>image_path TSV (MiniGPT-5's CC3M format)")
    parser.add_argument("--cc3m-images", help="folder the TSV's image paths are relative to (default: its folder)")
    parser.add_argument("--targets", help="target store of the TSV's captions (caption MSE; none: LDM + text only)")
    parser.add_argument("--vist", help="stage 2: VIST SIS JSON or MiniGPT-5's cleaned {story_id: [steps]} JSON")
    parser.add_argument("--vist-images", help="folder of the VIST images (default: the JSON's folder)")
    parser.add_argument("--mmdialog", help="stage 2: MMDialog JSONL conversations")
    parser.add_argument("--mmdialog-images", help="folder of <media_id>.jpg (default: the JSONL's folder)")
    parser.add_argument("--max-turn-tokens", type=int, default=50, help="MMDialog: stop a dialogue at a longer turn")
    parser.add_argument("--max-length", type=int, default=512, help="stage-2 example length limit in tokens")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--stage1-steps", type=int, default=1)
    parser.add_argument("--stage2-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo backend when distributed)")
    args = parser.parse_args()
    if args.tiny:
        given = [name for name in ("text_model", "vision_model", "diffusion_model", "cc3m", "cc3m_images", "targets",
                                   "vist", "vist_images", "mmdialog", "mmdialog_images") if getattr(args, name)]
        if given:
            parser.error(f"--tiny builds its own backbones and data; drop "
                         f"{', '.join('--' + n.replace('_', '-') for n in given)}")
        paths = tiny_data(args.tiny)
    else:
        if not args.cc3m or not (args.vist or args.mmdialog):
            parser.error("give --tiny, or --cc3m and at least one of --vist / --mmdialog")
        paths = {"text": args.text_model or "Vision-CAIR/vicuna-7b",
                 "vision": args.vision_model or "openai/clip-vit-large-patch14",
                 "diffusion": args.diffusion_model or "stabilityai/stable-diffusion-2-1-base",
                 "cc3m": args.cc3m, "targets": args.targets, "vist": args.vist, "mmdialog": args.mmdialog}
    ldm = LatentDiffusionLoss.from_pretrained(paths["diffusion"], snr_gamma=5.0)
    stage1_dir, stage2_dir = (os.path.join(args.output_dir, name) for name in ("stage1", "stage2"))
    stage1(paths, args, stage1_dir, ldm)
    stage2(paths, args, stage1_dir, stage2_dir, ldm)
    if torch.distributed.is_initialized():  # tear gloo / NCCL down before exit on every rank
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
