"""Retrieval latency: exact top-5 over 1M x 256 fp16 candidates, as bytes/s against measured memory bandwidth.

The bandwidth reference is the best of several full reads (``sum``) of a buffer as large as the index, on the same
device. The search scans every candidate once per query, so bytes/s = index bytes / latency; target >= 80% (bench_index_search.py adds FAISS and IVF-PQ).

    python bench/bench_retrieval.py                       # CPU, in-memory and memory-mapped index
    python bench/bench_retrieval.py --device cuda --rows 10000000
"""

import argparse
import statistics
import tempfile
import time

import torch

from gill_hf import RetrievalIndex


def timed_interleaved(fns: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them so load drift hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (page cache, kernels)
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def search_parser(description: str) -> argparse.ArgumentParser:
    """The options every search benchmark takes: index size (rows x dim), k, device and timing repeats."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    return parser


def main():
    args = search_parser(__doc__).parse_args()

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(args.rows, args.dim, generator=generator, dtype=torch.float32).half()
    index = RetrievalIndex(embeddings, [f"{i}.jpg" for i in range(args.rows)], logit_scale=2.659,
                           dtype=torch.float16)
    del embeddings
    index.embeddings = index.embeddings.to(args.device)
    query = torch.randn(1, args.dim, generator=generator)
    nbytes = index.embeddings.numel() * index.embeddings.element_size()

    buffer = torch.empty_like(index.embeddings).normal_()
    fns = {"bandwidth": lambda: buffer.sum(), "in memory": lambda: index.search(query, k=args.k)}
    with tempfile.TemporaryDirectory() as folder:
        if args.device == "cpu":
            index.save(folder)
            mapped = RetrievalIndex.load(folder)  # memory-mapped; page cache warm after the warm-up call
            fns["memory-mapped"] = lambda: mapped.search(query, k=args.k)
        results = timed_interleaved(fns, args.device, args.repeats)
        del fns
    bandwidth = nbytes / min(results.pop("bandwidth"))

    print(f"{args.rows:,} x {args.dim} fp16 candidates ({nbytes / 2**20:.0f} MiB) on {args.device}, top-{args.k}, "
          f"{args.repeats} runs")
    print(f"measured memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    for name, times in results.items():
        best, median = min(times), statistics.median(times)
        print(f"{name:>14}: best {best * 1e3:7.2f} ms, median {median * 1e3:7.2f} ms -> "
              f"{nbytes / best / 1e9:6.1f} GB/s = {nbytes / best / bandwidth:.0%} of bandwidth (target >= 80%)")


if __name__ == "__main__":
    main()
