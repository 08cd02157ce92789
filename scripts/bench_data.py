"""Packed tokens/s of the data loader on this CPU (warm cache).

    python scripts/bench_data.py                                  # default corpus + default tokenizer
    python scripts/bench_data.py --tokenizer /path/to/tokenizer_dir   # e.g. a 49k-vocab one

Measures, for seq_len 4096 and batch 2 (per rank):
- build: build_dataloader() on a warm cache (tokenized ids found on disk);
- loader: batches/s of iterating the loader as fast as it goes (prefetch thread on, and off);
- streaming: the same with on-the-fly tokenization (nothing cached);
- rank 0 of 8: every rank reads the whole stream and builds its own rows;
- wait: what a training loop whose step takes `--step-ms` waits for each batch, prefetch on and off.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

from bench_utils import meta

from nemo_lite.components.datasets import DataConfig, build_dataloader


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tokens_per_s(cfg: DataConfig, n_batches: int, **kw) -> tuple[float, float]:
    t0 = time.perf_counter()
    loader = build_dataloader(cfg, **kw)
    build_s = time.perf_counter() - t0
    it = iter(loader)
    next(it)  # thread started, first batch out
    t0 = time.perf_counter()
    tokens = sum(b["input_ids"].numel() for b in itertools.islice(it, n_batches))
    rate = tokens / (time.perf_counter() - t0)
    loader.close()
    return rate, build_s


def wait_per_batch(cfg: DataConfig, n_batches: int, step_ms: float) -> float:
    """Mean time next() blocks while the 'training step' runs. The step is a sleep: on a GPU the
    trainer's thread mostly waits for the device, without holding the GIL."""
    loader = build_dataloader(cfg)
    it = iter(loader)
    next(it)
    waited = 0.0
    for _ in range(n_batches):
        time.sleep(step_ms / 1e3)
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
    loader.close()
    return waited / n_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="default")
    parser.add_argument("--tokenizer", default="default")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=100.0)
    parser.add_argument("--cache-dir", default=None, help="datasets cache (default: HF_DATASETS_CACHE)")
    args = parser.parse_args()

    base = dict(
        source=args.source,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    cfg = DataConfig(**base)
    t0 = time.perf_counter()
    loader = build_dataloader(cfg)  # warms the cache (tokenizes on the first run ever)
    first_build = time.perf_counter() - t0
    vocab = loader.vocab_size
    docs = loader.source.num_documents
    del loader

    results = {}
    results["loader, prefetch thread"], warm_build = tokens_per_s(cfg, args.batches)
    results["loader, no prefetch"], _ = tokens_per_s(DataConfig(**base, prefetch=0), args.batches)
    results["streaming (tokenize on the fly)"], _ = tokens_per_s(DataConfig(**base, streaming=True), args.batches)
    results["rank 0 of 8 (reads all rows)"], _ = tokens_per_s(cfg, args.batches // 4, rank=0, world_size=8)
    wait_ms = {p: 1e3 * wait_per_batch(DataConfig(**base, prefetch=p), 20, args.step_ms) for p in (2, 0)}

    where = meta()
    print(f"command   {where['command']}")
    print(f"date      {where['date']}")
    print(f"cpu       {cpu_name()}, nproc {os.cpu_count()}")
    print(f"software  python {platform.python_version()}, torch {where['torch']}")
    print(f"data      {args.source}: {docs} documents; tokenizer {args.tokenizer}: vocab {vocab}")
    print(f"shape     batch {args.batch_size} x seq_len {args.seq_len} per rank")
    print(f"build     first call {first_build:.2f} s (this process), warm {warm_build:.2f} s")
    for name, rate in results.items():
        print(f"{name:34s} {rate / 1e3:10.0f} k tokens/s")
    for p, ms in wait_ms.items():
        print(f"{f'trainer waits per batch, prefetch={p}':34s} {ms:10.3f} ms  (step of {args.step_ms:.0f} ms)")


if __name__ == "__main__":
    main()
