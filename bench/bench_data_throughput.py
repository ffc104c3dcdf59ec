"""Stage-1 data throughput: samples/s decoded and collated, in-memory TSV vs webdataset shards vs datasets streaming.

The same JPEG corpus is written three ways (a TSV + image folder, img2dataset-style shards, and those shards read
through ``datasets.load_dataset("webdataset", streaming=True)``); each is read by a ``DataLoader`` with the same
``GILLDataCollator`` (decode, CLIP preprocessing, caption tokens) and workers, and the rates are printed as ratios to
the TSV path, measured in one run (interleaved, best of ``--repeats``; worker start-up included).

    python bench/bench_data_throughput.py                      # 2 workers, 512 samples of 256 x 256
    python bench/bench_data_throughput.py --workers 8 --samples 4096 --image-size 512
"""

import argparse
import io
import itertools
import tarfile
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.training import CaptionImageDataset, GILLDataCollator, StreamingCaptionDataset


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random image (gradients + noise), so JPEG sizes resemble photos more than flat colours do."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = rng.uniform(0.2, 1.0, 3) * (ramp[None, :, None] + ramp[:, None, None]) / 2
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_corpus(root: Path, samples: int, size: int, per_shard: int) -> tuple[Path, list[str]]:
    """The TSV (with its image folder) and the shards of one corpus."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows, shards, tar = ["caption\timage"], [], None
    for i in range(samples):
        data, caption = _jpeg(rng, size), f"photo number {i} of a smooth gradient"
        (root / "images" / f"{i:06d}.jpg").write_bytes(data)
        rows.append(f"{caption}\timages/{i:06d}.jpg")
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(str(root / f"{len(shards):05d}.tar"))
            tar = tarfile.open(shards[-1], "w")
        for suffix, payload in (("jpg", data), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:09d}.{suffix}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    return root / "train.tsv", shards


def rate(dataset, collator, samples: int, batch_size: int, workers: int) -> float:
    """Samples/s of one pass of ``samples`` through a fresh loader (for a stream: its first ``samples``)."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=workers,
                        persistent_workers=False)
    start = time.perf_counter()
    seen = sum(batch["input_ids"].shape[0] for batch in itertools.islice(loader, samples // batch_size))
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=128, help="samples per webdataset shard")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the workers do the work; one thread each, as on a 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_tiny_backbones(Path(tmp) / "tiny")
        processor = GILLForConditionalGeneration.from_backbones(paths["opt"], paths["clip"]).processor
        collator = GILLDataCollator(processor, max_length=32)
        tsv, shards = write_corpus(Path(tmp) / "corpus", args.samples, args.image_size, args.per_shard)
        streamed = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        sources = {"TSV (in memory)": lambda: CaptionImageDataset.from_tsv(tsv),
                   "webdataset shards": lambda: StreamingCaptionDataset.from_shards(shards),
                   "datasets streaming": lambda: StreamingCaptionDataset.from_hf_dataset(
                       streamed, {"caption": "txt", "image": "jpg"})}
        best = {name: 0.0 for name in sources}
        for _ in range(args.repeats):
            for name, make in sources.items():
                dataset = make()
                if isinstance(dataset, StreamingCaptionDataset):
                    dataset.set_split(0, 1, args.batch_size)
                best[name] = max(best[name], rate(dataset, collator, args.samples, args.batch_size, args.workers))
    reference = best["TSV (in memory)"]
    print(f"{args.samples} samples of {args.image_size} px JPEG, batch {args.batch_size}, {args.workers} workers, "
          f"best of {args.repeats}")
    for name, value in best.items():
        print(f"  {name:20s} {value:8.1f} samples/s   {value / reference:5.2f}x the TSV path")


if __name__ == "__main__":
    main()
