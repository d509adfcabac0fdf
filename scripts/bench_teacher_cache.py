"""The teacher cache at ImageNet size: each rank's peak resident memory while writing and while reading, the files'
sizes, the write and read speeds.

    .venv/bin/python scripts/bench_teacher_cache.py --dir /tmp/cache_bench   # 1,281,167 images x 100 epochs
    .venv/bin/python scripts/bench_teacher_cache.py --images 100000 --epochs 5 --dir /tmp/cache_bench  # smaller

A synthetic cache (top-10 of 1,000 classes, fp16 values by default) is written by slimforge's own writer
(train/cache_files.py: the size check, ``ShardWriter``, ``commit_cache``, as train/cache_teacher.py uses them) in
--ranks processes at once, each its contiguous share, epoch by epoch, in batches of --write-batch as the caching
loader hands them; then read by its reader (``CacheReader.lookup``, what ``train.teacher_placement=cached`` calls)
in --ranks fresh processes at once, each looking up its share of a random permutation of all the samples (a
distributed sampler's order, the permutation differing per epoch) in batches of --batch, for every epoch (or
--read-epochs of them, spread over the cache). The teacher's outputs are a pure function of (epoch, sample), so
every lookup is checked against what was written. Each process reports its peak resident memory (VmHWM, from
/proc/self/status) after its imports and at its end. Write time is the writer's (appends and close; generating
the synthetic outputs is timed apart); "+ fsync" adds forcing the files to disk, which the writer leaves to the OS.
The cache is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slimforge.train.cache_files import (
    ARRAYS,
    CacheReader,
    ShardWriter,
    cache_bytes,
    cache_layout,
    check_free_space,
    commit_cache,
    shard_file,
)


def peak_rss() -> int:
    """This process's peak resident memory, bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def synthetic(epoch: np.ndarray, index: np.ndarray, k: int, classes: int):
    """Teacher-like outputs of samples ``index [B]`` at ``epoch [B]``: values ``[B, k]`` (descending), class
    indices ``[B, k]`` (distinct while 97·k < classes), lse ``[B]``."""
    base = (index * 7 + epoch * 13) % 1009
    j = np.arange(k)
    values = (8.0 - 0.5 * j)[None, :] + (base / 1009.0)[:, None]
    indices = (base[:, None] + 97 * j[None, :]) % classes
    lse = (index % 4093) * 1e-3 + epoch
    return values.astype(np.float32), indices, lse.astype(np.float32)


def write(args, layout: dict) -> dict:
    rank, partial = args.rank, Path(args.dir) / "cache.partial"
    start, stop = layout["shards"][rank]
    total, rows = layout["epochs"] * (stop - start), stop - start
    baseline = peak_rss()
    writer = ShardWriter(partial, layout, rank)
    generate = append = 0.0
    for p in range(0, total, args.write_batch):
        pos = np.arange(p, min(p + args.write_batch, total))
        t0 = time.perf_counter()
        epoch, index = pos // rows, start + pos % rows
        outputs = synthetic(epoch, index, layout["topk"], layout["num_classes"])
        t1 = time.perf_counter()
        writer.append(epoch, index, *outputs)
        append += time.perf_counter() - t1
        generate += t1 - t0
    t0 = time.perf_counter()
    writer.close()
    append += time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in ARRAYS:
        with open(shard_file(partial, rank, name), "rb+") as f:
            os.fsync(f.fileno())
    fsync = time.perf_counter() - t0
    size = sum(shard_file(partial, rank, n).stat().st_size for n in ARRAYS)
    return {"rank": rank, "entries": total, "bytes": size, "write_s": append, "fsync_s": fsync,
            "generate_s": generate, "baseline_rss": baseline, "peak_rss": peak_rss()}  # fmt: skip


def read(args, layout: dict) -> dict:
    rank, ranks = args.rank, layout["ranks"]
    baseline = peak_rss()
    reader = CacheReader(Path(args.dir) / "cache")
    epochs = np.unique(np.linspace(0, layout["epochs"] - 1, args.read_epochs or layout["epochs"]).round().astype(int))
    k, classes = layout["topk"], layout["num_classes"]
    lookups = entries = 0
    seconds = 0.0
    for epoch in epochs:
        share = np.random.default_rng(int(epoch)).permutation(layout["num_samples"])[rank::ranks]
        for j in range(0, len(share), args.batch):
            index = torch.from_numpy(share[j : j + args.batch])
            t0 = time.perf_counter()
            values, indices, lse = reader.lookup(torch.full_like(index, int(epoch)), index)
            seconds += time.perf_counter() - t0
            want = synthetic(np.full(len(index), epoch), index.numpy(), k, classes)
            dtype = np.float16 if layout["dtype"] == "fp16" else np.float32
            if not (np.array_equal(values.numpy(), want[0].astype(dtype).astype(np.float32))
                    and np.array_equal(indices.numpy(), want[1]) and np.array_equal(lse.numpy(), want[2])):  # fmt: skip
                raise SystemExit(f"rank {rank}: epoch {epoch} lookup differs from what was written")
            lookups, entries = lookups + 1, entries + len(index)
    return {"rank": rank, "epochs_read": len(epochs), "lookups": lookups, "entries": entries, "read_s": seconds,
            "baseline_rss": baseline, "peak_rss": peak_rss()}  # fmt: skip


def run_ranks(role: str, args, layout: dict) -> list[dict]:
    """Starts one fresh process per rank at once and returns their reports."""
    sizes = ["--batch", str(args.batch), "--write-batch", str(args.write_batch), "--read-epochs", str(args.read_epochs)]
    base = [sys.executable, __file__, "--role", role, "--layout", json.dumps(layout), "--dir", args.dir, *sizes]
    procs = [subprocess.Popen([*base, "--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(args.ranks)]
    reports = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a {role} rank failed (exit {p.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="lookups: samples per rank per step")
    parser.add_argument("--write-batch", type=int, default=1024, help="writes: the teacher's batch")
    parser.add_argument("--read-epochs", type=int, default=0, help="epochs read (spread out); 0: all")
    parser.add_argument("--dir", default="/tmp/slimforge_cache_bench")
    parser.add_argument("--keep", action="store_true", help="keep the cache")
    parser.add_argument("--role", choices=("write", "read"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.role:  # one rank's process
        layout = json.loads(args.layout)
        print(json.dumps((write if args.role == "write" else read)(args, layout)))
        return 0

    layout = cache_layout(args.epochs, args.images, args.classes, args.topk, args.dtype, args.ranks)
    root = Path(args.dir)
    needed = cache_bytes(layout)
    print(f"cache: {args.images:,} images x {args.epochs} epochs, top-{args.topk} of {args.classes} classes, "
          f"{args.dtype} values, {layout['index_dtype']} indices, {args.ranks} ranks: "
          f"{needed / 1e9:.3f} GB estimated")  # fmt: skip
    check_free_space(root, needed)
    shutil.rmtree(root, ignore_errors=True)
    (root / "cache.partial").mkdir(parents=True)
    t0 = time.perf_counter()
    writes = run_ranks("write", args, layout)
    wall = time.perf_counter() - t0
    meta = commit_cache(root / "cache.partial", root / "cache", {**layout, "random_views": True})
    for f in sorted((root / "cache").iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>15,d} bytes")
    print(f"total {meta['bytes']:,} bytes (estimated {needed:,}); write wall {wall:.1f} s with process starts")
    t0 = time.perf_counter()
    reads = run_ranks("read", args, layout)
    read_wall = time.perf_counter() - t0
    mb = 1e6
    for w in writes:
        print(f"write rank {w['rank']}: {w['entries']:,} entries, {w['bytes'] / mb:,.0f} MB in {w['write_s']:.1f} s "
              f"({w['bytes'] / mb / w['write_s']:,.0f} MB/s; + fsync {w['fsync_s']:.1f} s: "
              f"{w['bytes'] / mb / (w['write_s'] + w['fsync_s']):,.0f} MB/s; "
              f"generating the outputs {w['generate_s']:.1f} s); "
              f"peak RSS {w['peak_rss'] / mb:,.0f} MB (after imports {w['baseline_rss'] / mb:,.0f} MB)")  # fmt: skip
    entry = needed / (args.epochs * args.images)
    for r in reads:
        print(f"read rank {r['rank']}: {r['epochs_read']} epoch(s), {r['lookups']:,} lookups of {args.batch}, "
              f"{r['entries']:,} entries in {r['read_s']:.1f} s ({r['entries'] / r['read_s']:,.0f} entries/s, "
              f"{r['entries'] * entry / mb / r['read_s']:,.1f} MB/s of entries, "
              f"{r['read_s'] / r['lookups'] * 1e3:.3f} ms per lookup), every lookup as written; "
              f"peak RSS {r['peak_rss'] / mb:,.0f} MB "
              f"(after imports {r['baseline_rss'] / mb:,.0f} MB)")  # fmt: skip
    print(f"read wall {read_wall:.1f} s with process starts and checks")
    peak = max(x["peak_rss"] for x in writes + reads)
    print(f"largest peak RSS of a rank: {peak / mb:,.0f} MB ({'under' if peak < 2e9 else 'OVER'} 2 GB)")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
