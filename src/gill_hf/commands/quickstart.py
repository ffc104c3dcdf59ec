"""``gill-hf quickstart``: the whole method on tiny offline backbones, in a couple of minutes on a CPU.

Builds tiny random backbones, a procedurally generated shapes corpus with diffusion text-encoder targets, trains
the GILL adapter on all four losses of Eq. 5, measures retrieval Recall@1 on held-out pairs, saves the adapter,
reloads it and checks that the reload answers identically.
"""

import json
import os
import time


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel

    from ..modeling_gill import GILLForConditionalGeneration
    from ..tiny import build_tiny_backbones
    from ..toy_data import shape_corpus

    torch.manual_seed(args.seed)
    out_dir = os.path.abspath(args.out)
    paths = build_tiny_backbones(os.path.join(out_dir, "backbones"))
    model = GILLForConditionalGeneration.from_backbones(
        paths["opt"], paths["clip"], paths["sd"], mapper_hidden_dim=64, mapper_ffn_dim=128,
        mapper_encoder_layers=2, mapper_decoder_layers=2)
    proc = model.processor
    corpus = shape_corpus(args.train_size + args.eval_size, seed=args.seed)
    images = proc.preprocess_images([image for image, _ in corpus])
    captions = proc.encode_captions([caption for _, caption in corpus], max_length=24)
    sd_tok = AutoTokenizer.from_pretrained(paths["sd"], subfolder="tokenizer")
    sd_text = CLIPTextModel.from_pretrained(paths["sd"], subfolder="text_encoder").eval()
    with torch.no_grad():  # T_psi(y), precomputed once (paper Sec. 3.2)
        tokens = sd_tok([c for _, c in corpus], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt")
        targets = sd_text(**tokens).last_hidden_state
    train = slice(0, args.train_size)
    held_out = slice(args.train_size, None)

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    history = []
    generator = torch.Generator().manual_seed(args.seed)
    for _ in tqdm(range(args.steps), desc="training GILL adapter"):
        idx = torch.randperm(args.train_size, generator=generator)[:args.batch_size]
        out = model(captions["input_ids"][train][idx], captions["attention_mask"][train][idx],
                    images[train][idx], targets[train][idx])
        optim.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        model.renormalize_img_embeddings()
        history.append({k: round(out[k].item(), 4) for k in
                        ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss")})

    model.eval()
    with torch.no_grad():
        result = model(captions["input_ids"][held_out], captions["attention_mask"][held_out], images[held_out],
                       targets[held_out], pack=False)
        text = torch.nn.functional.normalize(result.text_embeds, dim=-1)
        image = torch.nn.functional.normalize(result.image_embeds, dim=-1)
        recall_at_1 = (text @ image.T).argmax(1).eq(torch.arange(len(text))).float().mean().item()
    adapter_dir = os.path.join(out_dir, "gill-adapter")
    model.save_pretrained(adapter_dir)
    reloaded = GILLForConditionalGeneration.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        again = reloaded(captions["input_ids"][held_out], captions["attention_mask"][held_out], images[held_out],
                         targets[held_out], pack=False)
    identical = torch.equal(again.gen_embeds, result.gen_embeds) and torch.equal(again.text_embeds,
                                                                                 result.text_embeds)
    report = {"first_step": history[0], "last_step": history[-1],
              "held_out_recall_at_1": round(recall_at_1, 3), "chance": round(1 / args.eval_size, 3),
              "held_out_gen_loss": round(result.gen_loss.item(), 4), "reload_identical": identical,
              "adapter_dir": adapter_dir}
    with open(os.path.join(out_dir, "report.json"), "w") as handle:
        json.dump({"summary": report, "history": history}, handle, indent=2)
    print(json.dumps(report, indent=2))
    print(f"everything is in {out_dir} (report.json, gill-adapter/, backbones/)")
    return 0 if identical else 1


def register(subparsers):
    parser = subparsers.add_parser("quickstart", help=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gill-quickstart")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=192)
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
