"""Index search at 1M rows: (1) exact top-5 over 1M x 256 fp16 rows as a fraction of the fp16 read floor,
(2) IVF-PQ recall@5 against the exact top-5.

(1) The exact scan of the stored rows with torch matmuls (``scan="torch"``) and, on CPU with faiss installed,
with FAISS's fp16 scanner over row blocks in parallel threads (``scan="faiss"``, what ``"auto"`` picks for one
query), each over rows in memory and over a saved index loaded memory-mapped; then the exact fp16 FAISS index
(``use_faiss("fp16")``) in memory and memory-mapped. Each search's floor is the time to read the very bytes it
scans once: the best single run of three read kernels over them (fp16 ``sum``, ``sum`` of the bytes viewed as
int64, ``amax`` of them viewed as int16; the fastest reads at the memory bandwidth, the others are partly
compute-bound). Memory reads at different speeds by its pages (on a 2-core VM, 4 KiB anonymous pages about 1.4x
slower than the huge pages the index's in-memory rows use, or than the page cache), so each search is held to its own
bytes (the in-memory ``faiss fp16`` index keeps its codes in FAISS's own 4 KiB-page memory). An exact
search reads every row once, so fraction = floor / latency (goal >= 80%). Runs alternate between the probes and the
searches so load drift hits all alike, and each run follows a cache flush: a read of --evict-mib MiB of other memory
(numpy on the CPU: single-threaded, so no torch OpenMP worker is left spin-waiting, which right after a torch op
takes a share of a core from the FAISS scan threads for ~16 ms; ``OMP_WAIT_POLICY=PASSIVE`` avoids that). CPU time
(all threads) is printed beside wall time: on a machine shared with other jobs it tracks the work done rather than
the share of the cores received. (2) Synthetic clustered unit rows (real embeddings
cluster; i.i.d. Gaussian rows in 256-d have no meaningful neighbours), queries near random rows; IVF-PQ with the
default re-rank of candidates over the stored rows and with FAISS's own PQ scores (``rerank=1``). Training and
adding 1M rows take about 20 s on 2 cores.

    python bench/bench_index_search.py                    # both, CPU
    python bench/bench_index_search.py --skip-ivfpq --device cuda --rows 10000000
"""

import argparse
import importlib.util
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from gill_hf import RetrievalIndex
from gill_hf.retrieval import fp16_codes


def exact_vs_floor(rows: int, dim: int, k: int, device: str, repeats: int, evict_mib: int):
    generator = torch.Generator().manual_seed(0)
    index = RetrievalIndex(torch.randn(rows, dim, generator=generator).half(), [str(i) for i in range(rows)],
                           dtype=torch.float16)
    index.embeddings = index.embeddings.to(device)
    query = torch.randn(1, dim, generator=generator)
    nbytes = index.embeddings.numel() * index.embeddings.element_size()
    faiss = device == "cpu" and importlib.util.find_spec("faiss") is not None
    scans = ("torch", "faiss") if faiss else ("torch",)
    searches = {f"{scan} scan": (index, scan) for scan in scans}  # name -> (index, scan)
    with tempfile.TemporaryDirectory() as folder:
        if device == "cpu":
            index.save(f"{folder}/rows")
            mapped = RetrievalIndex.load(f"{folder}/rows")  # memory-mapped; page cache warm after the warm-up
            searches.update({f"{scan} scan mmap": (mapped, scan) for scan in scans})
        if faiss:
            fp16 = RetrievalIndex(index.embeddings, index.paths, normalized=True).use_faiss("fp16")
            fp16.save(f"{folder}/fp16")
            searches.update({"faiss fp16": (fp16, "auto"),
                             "faiss fp16 mmap": (RetrievalIndex.load(f"{folder}/fp16"), "auto")})  # IO_FLAG_MMAP_IFC
        memory = {name: _scanned_bytes(searched) for name, (searched, _) in searches.items()}
        fns = {}
        for name, (searched, scan) in searches.items():
            fns.update({f"{name} | {probe}": read(memory[name]) for probe, read in READS.items()})
            fns[name] = lambda searched=searched, scan=scan: searched.search(query, k=k, scan=scan)
        cpu = {name: [] for name in fns}
        evict = torch.ones(evict_mib << 17, dtype=torch.int64, device=device)  # evict_mib MiB
        flush = evict.numpy().sum if device == "cpu" else evict.sum  # numpy: no OpenMP team left spinning
        times = timed_interleaved({name: _cpu_timed(fn, cpu[name]) for name, fn in fns.items()}, device, repeats,
                                  before=flush if evict_mib else lambda: None)
    print(f"(1) exact top-{k} over {rows:,} x {dim} fp16 ({nbytes / 2**20:.0f} MiB) on {device}, {repeats} runs, "
          f"{torch.get_num_threads()} torch threads, caches flushed by a {evict_mib} MiB read before each run; "
          f"floor = one read of the scanned bytes at the best probe's speed")
    for name in searches:
        reads = {probe: min(times[f"{name} | {probe}"]) for probe in READS}
        floor = min(reads.values())
        cpu_floor = min(min(cpu[f"{name} | {probe}"]) for probe in READS)
        search = times[name]
        probes = ", ".join(f"{probe} {nbytes / best / 1e9:.1f}" for probe, best in reads.items())
        print(f"    {name:>16}: best {min(search) * 1e3:6.2f} ms, median {statistics.median(search) * 1e3:6.2f} ms "
              f"-> {floor / min(search):.0%} of its read floor {floor * 1e3:.2f} ms (median "
              f"{floor / statistics.median(search):.0%}; goal >= 80%); CPU time {cpu_floor / min(cpu[name]):.0%} of "
              f"the floor's; reads GB/s: {probes}")


READS = {"fp16 sum": lambda rows: lambda: rows.sum(), "int64 sum": lambda rows: lambda: rows.view(torch.int64).sum(),
         "int16 amax": lambda rows: lambda: rows.view(torch.int16).amax()}


def _scanned_bytes(index: RetrievalIndex) -> torch.Tensor:
    """The fp16 rows a search of ``index`` reads: its embeddings, or the codes of its exact fp16 FAISS index."""
    return index.embeddings if index._faiss is None else torch.from_numpy(fp16_codes(index._faiss))


def timed_interleaved(fns: dict, device: str, repeats: int, before=lambda: None) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating between them so load drift hits all alike; ``before``
    runs untimed ahead of each call (a cache flush)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (page cache, kernels)
    for _ in range(repeats):
        for name, fn in fns.items():
            before()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def _cpu_timed(fn, into: list):
    """``fn`` that also appends its process CPU time (all threads) to ``into``: on a machine shared with other
    jobs, wall time measures the share of the cores this process got, CPU time the work it did."""
    def run():
        start = time.process_time()
        fn()
        into.append(time.process_time() - start)
    return run


def _clustered(rows: int, dim: int, queries: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(rows // 1000, dim, generator=generator)
    data = torch.empty(rows, dim)
    for start in range(0, rows, 1 << 17):  # bounded temporaries
        n = min(1 << 17, rows - start)
        data[start:start + n] = F.normalize(centres[torch.randint(len(centres), (n,), generator=generator)]
                                            + 0.5 * torch.randn(n, dim, generator=generator), dim=-1)
    picked = data[torch.randint(rows, (queries,), generator=generator)]
    return data, picked + 0.3 * torch.randn(queries, dim, generator=generator)


def ivfpq_recall(rows: int, dim: int, k: int, queries: int, nlist: int, nprobe: int):
    generator = torch.Generator().manual_seed(1)
    data, query = _clustered(rows, dim, queries, generator)
    index = RetrievalIndex(data, [str(i) for i in range(rows)], dtype=torch.float16, normalized=True)
    del data
    _, exact = index.search(query, k=k)
    start = time.perf_counter()
    index.use_faiss("ivfpq", nlist=nlist, nprobe=nprobe)
    built = time.perf_counter() - start
    print(f"(2) IVF{nlist},PQ{index._faiss.pq.M} (nprobe {nprobe}) over {rows:,} x {dim} clustered rows, "
          f"{queries} queries; trained and added in {built:.0f} s")
    for rerank in (index._rerank, 1):
        index._rerank = rerank
        start = time.perf_counter()
        _, found = index.search(query, k=k)
        latency = (time.perf_counter() - start) / queries
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
        label = f"re-rank of {rerank * k} candidates" if rerank > 1 else "PQ scores only"
        print(f"    {label:>28}: recall@{k} {hits / exact.numel():.3f}, {latency * 1e3:.2f} ms / query")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--evict-mib", type=int, default=1024,
                        help="MiB read before each timed run, so no run finds the index in a cache left warm by "
                             "the one before (the 2-core VM reports a 480 MiB L3; 0: no flush)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--skip-ivfpq", action="store_true")
    args = parser.parse_args()
    exact_vs_floor(args.rows, args.dim, args.k, args.device, args.repeats, args.evict_mib)
    if not args.skip_ivfpq:
        ivfpq_recall(args.rows, args.dim, args.k, args.queries, args.nlist, args.nprobe)


if __name__ == "__main__":
    main()
