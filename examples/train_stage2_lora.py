"""MiniGPT-5 stage 2: LoRA on the LLM + latent-diffusion loss on VIST stories, continuing from a stage-1 adapter.

    # tiny random backbones and toy stories (CPU, seconds):
    python examples/train_stage2_lora.py --tiny /tmp/gill-tiny --output-dir /tmp/gill-stage2 --max-steps 10 --cpu
    # real run: a stage-1 GILL folder and VIST SIS annotations (images named <photo_flickr_id>.jpg):
    torchrun --nproc_per_node 8 examples/train_stage2_lora.py --stage1 runs/stage1 \\
        --vist sis/train.story-in-sequence.json --vist-images vist/images --output-dir runs/stage2

The result loads with ``GILLForConditionalGeneration.from_pretrained(output_dir)``: the GILL adapter in
``model.safetensors`` and the LoRA adapter (peft format) in ``lora/``.
"""

import argparse
import os

import torch

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.training import (GILLForInterleavedTraining, InterleavedDataCollator, LatentDiffusionLoss,
                              VISTTaskDataset, apply_lora, minigpt5_overrides, set_training_fields,
                              train_gill)
from gill_hf.toy_world import write_toy_vist

TINY_MAPPER = dict(mapper_hidden_dim=32, mapper_num_heads=4, mapper_ffn_dim=64, mapper_encoder_layers=2,
                   mapper_decoder_layers=2)


def tiny_stage1(root: str) -> tuple[str, str]:
    """A fresh MiniGPT-5-configured GILL on tiny backbones saved as the "stage-1" folder, and toy VIST stories."""
    bb = build_tiny_backbones(os.path.join(root, "backbones"))
    stage1 = os.path.join(root, "stage1-minigpt5")
    if not os.path.exists(os.path.join(stage1, "model.safetensors")):
        torch.manual_seed(0)
        GILLForConditionalGeneration.from_backbones(bb["llama"], bb["clip"], bb["sd"], **TINY_MAPPER,
                                                    **minigpt5_overrides("align")).save_pretrained(stage1)
    return stage1, write_toy_vist(os.path.join(root, "vist"), num_stories=4, steps=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", metavar="DIR", help="tiny random backbones and toy stories under DIR")
    parser.add_argument("--stage1", help="trained stage-1 GILL folder")
    parser.add_argument("--vist", help="VIST SIS JSON (or MiniGPT-5's cleaned {story_id: [steps]} JSON)")
    parser.add_argument("--vist-images", help="folder of the story images (default: the JSON's folder)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    stage1, vist = tiny_stage1(args.tiny) if args.tiny else (args.stage1, args.vist)
    if not (stage1 and vist):
        parser.error("give --tiny, or --stage1 and --vist")

    model = GILLForInterleavedTraining.from_pretrained(stage1).train()
    set_training_fields(model.config, **minigpt5_overrides("interleaved"))  # stage 2 of the same recipe
    apply_lora(model)  # r 8, alpha 16, dropout 0.05 on q_proj / v_proj (config values)
    ldm = LatentDiffusionLoss.from_pretrained(model.config.diffusion_model_name_or_path,
                                              snr_gamma=model.config.ldm_snr_gamma)
    dataset = VISTTaskDataset.from_json(vist, args.vist_images)
    collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm.image_size)
    trainer = train_gill(model, dataset, args.output_dir, data_collator=collator, ldm_loss=ldm,
                         max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                         learning_rate=args.learning_rate, logging_steps=1, use_cpu=args.cpu, disable_tqdm=True)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
