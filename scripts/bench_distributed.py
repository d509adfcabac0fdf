"""Supervised vs distillation step throughput, and per-rank state memory, under every launch strategy.

    .venv/bin/python scripts/bench_distributed.py            # all strategies this machine can run
    .venv/bin/python scripts/bench_distributed.py --strategies ddp zero3 --steps 40 --batch 32

Each row is a real `accelerate launch` of train/train.py and train/distill.py (student timm resnet10t, teacher
a random-init timm checkpoint, resnet18 unless --teacher names another, embedded MNIST-5k at 32×32, the same
per-rank micro-batch, --workers loader processes per rank: 0 loads in the training process between steps, so on a
machine with as many cores as ranks no loader competes with the step being timed), and reads
the run's summary.json: steady-state training images/s (3rd update to last, no evaluation) and the bytes of
parameters + optimizer state each rank holds (train/memory.py), and the teacher parameter bytes each rank holds
(the `+sharded-teacher` rows use train.teacher_placement=sharded; `+cached-teacher` first runs
train/cache_teacher.py under the same launch, then distils from its cache: its row also gives the caching time).
Strategies the machine cannot run are listed as skipped with the reason. The same script runs unchanged on a GPU
machine.

    .venv/bin/python scripts/bench_distributed.py --cache-sizes   # bytes per 1,000 images, k = 10 and k = all

--cache-sizes caches a random-init 100-class teacher on 1,600 synthetic training images (one epoch, fp16 and
fp32) at k = 10 and k = 100 (all) and prints the cache's size on disk per 1,000 images per cached epoch.

Two modes time the demo's teacher stage instead (configs/train/teacher_mnist.yaml under single.yaml, 1 epoch):

    .venv/bin/python scripts/bench_distributed.py --threads-check   # images/s at 1 thread vs the default rule
    .venv/bin/python scripts/bench_distributed.py --loader-only     # its training DataLoader alone vs training

--threads-check launches it twice, with OMP_NUM_THREADS=1 exported (what `accelerate launch` used to leave every
CPU process with) and with OMP_NUM_THREADS unset (train.cpu_threads' default rule: usable cores ÷ local
processes), and prints both runs' images/s and their ratio. --loader-only iterates the same config's training
DataLoader (train/data.py build_loader) for one epoch without a model, in this process, and prints its images/s
beside the training run's: when the two are close, the loader is the bottleneck.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# name -> (launch config, processes, extra overrides)
STRATEGIES = {
    "single": ("single.yaml", 1, ()),
    "ddp": ("ddp.yaml", 2, ()),
    "ddp+sharded-teacher": ("ddp.yaml", 2, ("train.teacher_placement=sharded",)),
    "ddp+cached-teacher": ("ddp.yaml", 2, ("train.teacher_placement=cached",)),
    "zero1": ("zero1.yaml", 2, ()),
    "zero2": ("zero2.yaml", 2, ()),
    "zero3": ("zero3.yaml", 2, ()),
    "zero3+sharded-teacher": ("zero3.yaml", 2, ("train.teacher_placement=sharded",)),
    "zero3-1proc": ("zero3.yaml", 1, ()),
    "fsdp": ("fsdp.yaml", 2, ()),
}
# The demo's teacher stage: (launch config, run config); one epoch, so one epoch of its loader compares.
DEMO = ("configs/accelerate/single.yaml", "configs/train/teacher_mnist.yaml")


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    import importlib.util

    import torch

    if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (EXTRAS=dev,deepspeed bash scripts/setup.sh)"
    if name == "fsdp" and not torch.cuda.is_available():
        return "FSDP through Accelerate needs GPUs (on CPU Accelerate drops it; the engine refuses)"
    n_gpu = torch.cuda.device_count()
    if n_gpu and STRATEGIES[name][1] > n_gpu:
        return f"needs {STRATEGIES[name][1]} GPUs, this machine has {n_gpu}"
    return None


def make_teacher(folder: Path, name: str = "resnet18") -> Path:
    import torch

    from slimforge.train.checkpoint import save_checkpoint
    from slimforge.train.data import DataConfig, describe
    from slimforge.train.models import ModelConfig, build_model

    data = DataConfig(source="embedded", name="mnist_5k", in_chans=1, image_size=32)
    info = describe(data)
    torch.manual_seed(0)
    model, spec = build_model(ModelConfig(name=name), 10, info["input_size"], info)
    return save_checkpoint(model.state_dict(), spec, folder / "teacher", extra={"data": dataclasses.asdict(data)})


def run(name: str, entry: str, teacher: Path, out: Path, args, more: tuple[str, ...] = ()) -> dict:
    launch_config, nproc, extra = STRATEGIES[name]
    if entry != "distill":
        extra = tuple(e for e in extra if not e.startswith("train.teacher_placement"))
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        f"configs/accelerate/{launch_config}",
        "--num_processes",
        str(nproc),
        f"train/{entry}.py",
        "--config",
        "configs/debug/tiny_distill.yaml",
        f"teacher.checkpoint={teacher}",
        f"train.output_dir={out}",
        "model.name=resnet10t",
        "data.max_train_samples=null",
        "data.max_val_samples=64",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"train.max_steps={args.steps}",
        "train.epochs=1",  # one epoch holds more than --steps updates of the 5,000 digits (the cache holds one)
        "train.tensorboard=false",
        *extra,
        *more,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    if entry == "cache_teacher":
        meta = json.loads((Path(more[0].split("=", 1)[1]) / "cache.json").read_text())
        return meta | {"wall_seconds": time.perf_counter() - start}
    return json.loads((out / "summary.json").read_text())


def cache_sizes() -> int:
    """Bytes of a one-epoch cache of 1,600 synthetic images from a 100-class teacher, per k and dtype."""
    import torch

    from slimforge.train.checkpoint import save_checkpoint
    from slimforge.train.data import DataConfig, describe
    from slimforge.train.models import ModelConfig, build_model

    data = DataConfig(source="synthetic", synthetic_samples=2000, synthetic_classes=100, in_chans=3, image_size=32,
                      val_fraction=0.2)  # fmt: skip
    print("| k | dtype | entries | bytes on disk | per 1,000 images per epoch |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        info = describe(data)
        torch.manual_seed(0)
        model, spec = build_model(ModelConfig(name="resnet10t"), 100, info["input_size"], info)
        teacher = save_checkpoint(model.state_dict(), spec, Path(tmp) / "t", extra={"data": dataclasses.asdict(data)})
        for k, dtype in ((10, "fp16"), (100, "fp16"), (10, "fp32"), (100, "fp32")):
            out = Path(tmp) / f"cache-{k}-{dtype}"
            cmd = [sys.executable, "train/cache_teacher.py", "--config", "configs/debug/tiny_distill.yaml",
                   f"teacher.checkpoint={teacher}", "data.source=synthetic", "data.synthetic_samples=2000",
                   "data.synthetic_classes=100", "data.in_chans=3", "data.max_train_samples=null",
                   "data.max_val_samples=64", "data.num_workers=0", "train.epochs=1", f"cache.path={out}",
                   f"cache.topk={k}", f"cache.dtype={dtype}", f"train.output_dir={Path(tmp) / 'run'}"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-2000:])
            meta = json.loads((out / "cache.json").read_text())
            n = meta["num_samples"] * meta["epochs"]
            print(f"| {k} | {dtype} | {n} | {meta['bytes']} | {meta['bytes'] / n * 1000 / 1e6:.3f} MB |")
    return 0


def run_demo(out: Path, omp_num_threads: str | None) -> dict:
    """One epoch of the demo's teacher stage; ``omp_num_threads`` None launches with the variable unset."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", DEMO[0], "train/train.py", "--config", DEMO[1]]
    cmd += ["train.epochs=1", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-2000:] or "failed")
    summary = json.loads((out / "summary.json").read_text())
    rank = summary["topology"]["ranks"][0]
    row = {k: summary[k] for k in ("steady_images_per_second", "train_images_per_second", "train_seconds")}
    return row | {"threads": rank["threads"], "threads_rule": rank.get("threads_rule", "not recorded")}


def loader_only() -> dict:
    """One epoch of the demo config's training DataLoader with no model: images/s from its 3rd batch to the last
    (as training's steady figure: worker start-up excluded) and over the whole epoch."""
    from slimforge.train.config import load_config
    from slimforge.train.data import build_loader, load_splits
    from slimforge.train.schema import RunConfig

    cfg = load_config(RunConfig, str(ROOT / DEMO[1]), ["train.epochs=1"])
    loader = build_loader(load_splits(cfg.data).train, cfg.data, is_training=True, seed=cfg.train.seed)
    start, images, steady = time.perf_counter(), 0, None
    for i, batch in enumerate(loader, start=1):
        images += batch["label"].shape[0]
        if i == 3:
            steady = (time.perf_counter(), images)
    end = time.perf_counter()
    return {
        "steady_images_per_second": round((images - steady[1]) / (end - steady[0]), 1),
        "epoch_images_per_second": round(images / (end - start), 1),
        "num_workers": cfg.data.num_workers,
        "batches": len(loader),
    }


def demo_checks(args) -> int:
    """The --threads-check and --loader-only modes (one training run serves both)."""
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.threads_check:
            print("[bench] demo teacher stage, OMP_NUM_THREADS=1 ...", file=sys.stderr, flush=True)
            rows["before: OMP_NUM_THREADS=1"] = run_demo(Path(tmp) / "omp1", "1")
        print("[bench] demo teacher stage, OMP_NUM_THREADS unset ...", file=sys.stderr, flush=True)
        rows["after: default rule"] = after = run_demo(Path(tmp) / "default", None)
    print(f"\nDemo teacher stage, 1 epoch: accelerate launch --config_file {DEMO[0]} train/train.py --config {DEMO[1]}")
    print(f"usable cores {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}\n")
    print("| run | intra-op threads (rule) | steady img/s | whole-run img/s | seconds |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['threads']} ({r['threads_rule']}) | {r['steady_images_per_second']} | "
            f"{r['train_images_per_second']} | {r['train_seconds']} |"
        )
    if args.threads_check:
        before = rows["before: OMP_NUM_THREADS=1"]
        ratio = after["steady_images_per_second"] / before["steady_images_per_second"]
        print(f"\nafter / before (steady images/s): {ratio:.2f}")
    if args.loader_only:
        print("[bench] its training DataLoader alone ...", file=sys.stderr, flush=True)
        loader = loader_only()
        share = after["steady_images_per_second"] / loader["steady_images_per_second"]
        print(f"\nThe same config's training DataLoader, 1 epoch, no model ({loader['num_workers']} worker(s)):\n")
        print("| what | steady img/s | whole-epoch img/s |")
        print("|---|---|---|")
        print(f"| loader only | {loader['steady_images_per_second']} | {loader['epoch_images_per_second']} |")
        print(f"| training | {after['steady_images_per_second']} | {after['train_images_per_second']} |")
        # The workers prefetch while the model steps, so a loader-bound run trains at close to the loader's rate;
        # 0.8 leaves room for the step's own host work (the main process collects each batch from the worker).
        verdict = "the loader is the bottleneck" if share > 0.8 else "the model step is the bottleneck"
        print(f"\ntraining runs at {share:.2f} of the loader's rate: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows | ({"loader_only": loader} if args.loader_only else {}), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--steps", type=int, default=30, help="optimizer updates per run (%(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="per-rank micro-batch (%(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating supervised/distill pairs (%(default)s)")
    parser.add_argument("--teacher", default="resnet18", help="timm architecture of the teacher (%(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank (%(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--threads-check", action="store_true", help="demo teacher stage: images/s at 1 thread vs the default"
    )
    parser.add_argument(
        "--loader-only", action="store_true", help="demo teacher stage: its DataLoader alone vs training"
    )
    parser.add_argument("--cache-sizes", action="store_true", help="teacher cache bytes per 1,000 images")
    args = parser.parse_args(argv)
    if args.cache_sizes:
        return cache_sizes()
    if args.threads_check or args.loader_only:
        return demo_checks(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(Path(tmp), args.teacher)
        for name in args.strategies:
            reason = unavailable(name)
            row = {"strategy": name, "processes": STRATEGIES[name][1], "skipped": reason}
            if reason is None:
                try:
                    more: tuple[str, ...] = ()
                    if "cached" in name:
                        cache = Path(tmp) / f"{name}-cache"
                        more = (f"cache.path={cache}",)
                        meta = run(name, "cache_teacher", teacher, Path(tmp) / f"{name}-c", args, more)
                        row["cache"] = {k: meta[k] for k in ("seconds", "wall_seconds", "bytes", "num_samples")}
                    ratios, rates, step_ms = [], {"train": [], "distill": []}, {"train": [], "distill": []}
                    for rep in range(args.repeats):  # alternating, so drift in the machine's speed hits both
                        for entry in ("train", "distill"):
                            out = Path(tmp) / f"{name}-{entry}-{rep}"
                            s = run(name, entry, teacher, out, args, more if entry == "distill" else ())
                            rates[entry].append(s["steady_images_per_second"])
                            step_ms[entry].append(s["steady_step_ms"])
                            row["memory"] = s["state_memory_per_rank"][0]
                            row["type"] = s["topology"]["sharding"]
                            if entry == "distill":
                                row["teacher_bytes"] = s["teacher_param_bytes_per_rank"][0]
                        ratios.append(step_ms["distill"][-1] / step_ms["train"][-1])
                    row.update({e: statistics.median(v) for e, v in rates.items()}, ratios=ratios)
                    row.update({f"{e}_ms": statistics.median(v) for e, v in step_ms.items()})
                    row["cost"] = statistics.median(ratios)
                except RuntimeError as e:
                    row["skipped"] = f"error: {e}"
            rows.append(row)
            print(f"[bench] {name}: {row}", file=sys.stderr, flush=True)

    mb = 1024 * 1024
    base = next((r for r in rows if r["strategy"] == "single" and not r["skipped"]), None)
    print(f"\nTraining throughput, per-rank micro-batch {args.batch}, {args.steps} updates, teacher {args.teacher}, "
          f"{args.workers} loader worker(s) per rank (images/s, all ranks)\n")  # fmt: skip
    print(f"(medians of {args.repeats} alternating supervised/distillation pairs; step: a batch in hand to its update")
    print("done, without waiting for the loader)\n")
    print("| strategy | processes | supervised img/s | distillation img/s | supervised step ms | distillation step "
          "ms | distill step cost (× supervised) | per pair |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["skipped"]:
            print(f"| {r['strategy']} | {r['processes']} | skipped: {r['skipped']} | | | | | |")
        else:
            print(
                f"| {r['strategy']} | {r['processes']} | {r['train']:.1f} | {r['distill']:.1f} | {r['train_ms']:.1f} | "
                f"{r['distill_ms']:.1f} | {r['cost']:.2f} | " + ", ".join(f"{x:.2f}" for x in r["ratios"]) + " |"
            )
    print("\nStudent parameters + optimizer state, and teacher parameters, held by one rank (MB)\n")
    print("| strategy | params | optimizer state | total | vs single process | vs zero3-1proc | teacher |")
    print("|---|---|---|---|---|---|---|")
    z1 = next((r for r in rows if r["strategy"] == "zero3-1proc" and not r["skipped"]), None)
    for r in rows:
        if r["skipped"]:
            continue
        m = r["memory"]
        total = m["param_bytes"] + m["optimizer_bytes"]
        vs = [
            f"{total / (b['memory']['param_bytes'] + b['memory']['optimizer_bytes']):.3f}" if b else "n/a"
            for b in (base, z1)
        ]
        print(
            f"| {r['strategy']} | {m['param_bytes'] / mb:.1f} | {m['optimizer_bytes'] / mb:.1f} | "
            f"{total / mb:.1f} | {vs[0]} | {vs[1]} | {r['teacher_bytes'] / mb:.1f} |"
        )
    for r in rows:
        if r.get("cache"):
            c = r["cache"]
            print(f"\n{r['strategy']}: caching {c['num_samples']} images took {c['seconds']:.1f} s of teacher work "
                  f"({c['wall_seconds']:.1f} s with the launch), {c['bytes'] / 1e6:.2f} MB on disk")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
