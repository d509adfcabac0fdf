"""Runs every GPU-only path of slimforge once on the embedded MNIST and writes ``OUT/gpu_check.{json,md}``.

    bash scripts/gpu_check.sh OUT          # the entry: installs offline over the GPU image, then runs this

Items, in order of value (each its own process with a time limit; pass / fail / skipped / not run, the figure, the
error). The whole run keeps to ``--budget`` seconds: an item gets at most what is left, and items that no longer fit
are reported as not run. Both reports are rewritten after every item, so a run stopped from outside still says what
it did.

- ``cuda``: the device, a bf16 matmul's TFLOP/s timed with CUDA events, bf16/fp16 autocast forward and backward,
  a one-rank NCCL all-reduce, gloo's all-reduce of a CUDA tensor, and ONNX Runtime's providers.
- ``teacher``: the resnet18 teacher, 1 epoch, one GPU (the other items distil from it).
- ``ddp_bf16``: distillation with the DDP launch config and bf16 autocast, one rank on NCCL.
- ``export``: ONNX + TorchScript export of that CUDA-trained student (parity-checked by export.py).
- ``cuda_parity``: its logits on the GPU in eager PyTorch, ONNX Runtime CUDA (when the image's onnxruntime has the
  provider) and TorchScript CUDA (TF32 off), each against eager FP32 on the CPU.
- ``benchmark``: the benchmark's GPU rows against the teacher on the same GPU (ORT CUDA/TensorRT rows skipped with
  the reason when the provider is missing).
- ``ddp_fp16``: as ``ddp_bf16`` with fp16 autocast (loss scaling).
- ``qat``: quantisation-aware training of the CUDA-trained student on the GPU, the teacher guiding it.
- ``export_int8``: its int8 ONNX export, parity- and integer-kernel-checked on the CPU.
- ``zero2_bf16``, ``zero3_bf16``: distillation under DeepSpeed ZeRO-2 / ZeRO-3, one rank on NCCL.
- ``fsdp_bf16_resume``: FSDP2 with bf16, SIGKILLed after its first resumable state, relaunched: it must resume.
- ``cached_teacher``: train/cache_teacher.py on the GPU, then distillation reading the cache.
- ``gpu_tests``: the GPU tier of the test suite (``pytest -m gpu tests/gpu``).
- ``two_ranks``, ``sharded_teacher``: need 2 GPUs. NCCL refuses two ranks on one device, and Accelerate places rank
  i on ``cuda:i``, so even a gloo launch cannot put two ranks on one GPU; with one GPU they are skipped with that
  reason (the CPU tier runs every 2-rank path over gloo).

``--dry-run`` checks every item's setup without a GPU: the modules import, every launch's run config validates with
its overrides, the launch configs, entries and launcher exist, the export and benchmark entries start, and the
benchmark's runtime names are registered. Exit status: 0 every item passed or was skipped with its reason, 1 an item
failed or did not run, 3 no CUDA GPU here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = 3
DISTILL = "configs/distill/mnist_resnet18_to_resnet10t.yaml"
QAT = "configs/distill/mnist_resnet10t_qat.yaml"
TEACHER = "configs/train/teacher_mnist.yaml"
GPU_RUNTIMES = [
    "torch-eager-cuda",
    "torch-eager-cuda-bf16",
    "torch-eager-cuda-fp16",
    "torch-eager-cuda-cl",
    "ort-cuda",
    "ort-tensorrt",
    "ort-tensorrt-fp16",
    "torchscript-cuda",
]
MIN_ITEM_SECONDS = 20
"""An item is started only if at least this much of the budget is left."""
ONE_GPU = ("needs 2 GPUs ({gpus} here): NCCL refuses two ranks on one device, and Accelerate places rank i on cuda:i, "
           "so a gloo launch cannot share one GPU either; the CPU tier covers the 2-rank paths over gloo")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and benchmark.md")
    p.add_argument("--work", help="folder for the runs and exports (default OUT/work)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all items together (%(default)s)")
    p.add_argument("--item-timeout", type=float, default=240, help="seconds one item may take (%(default)s)")
    p.add_argument("--only", nargs="+", help="run only these items (their prerequisites must have run)")
    p.add_argument("--dry-run", action="store_true", help="check every item's setup; needs no GPU")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # one item's in-process part
    return p.parse_args(argv)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def launch(config: str, processes: int, entry: str, run_config: str, out: Path, *overrides: str) -> list[str]:
    cmd = [bin_path("accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml"]
    cmd += ["--num_processes", str(processes), entry, "--config", run_config]
    return [*cmd, f"train.output_dir={out}", "train.tensorboard=false", "train.overwrite=true", *overrides]


def run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Runs ``cmd`` in the repository; ``(exit status, last part of its output)``; 124 on timeout."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "")[-4000:] + f"\n(killed after {timeout:.0f} s)"
    return proc.returncode, (out or "")[-4000:]


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1][:400]


class Failed(Exception):
    """An item's command failed: its message and the end of its output."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


def checked(cmd: list[str], timeout: float) -> str:
    code, text = run(cmd, timeout)
    if code != 0:
        raise Failed(f"exit {code}: {last_error(text)}", text)
    return text


def summary_figure(run_dir: Path) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    return (
        f"val_acc {s['val_acc']:.4f}, {s.get('steady_images_per_second') or 0:.0f} img/s steady, "
        f"compute {s.get('train_compute_dtype')}, {s.get('distributed_type')}"
    )


class Check:
    """Runs items under the budget and rewrites the reports after each one."""

    def __init__(self, out: Path, budget: float, timeout: float, only: list[str] | None, header: dict) -> None:
        self.out, self.budget, self.timeout, self.only, self.header = out, budget, timeout, only, header
        self.items: list[dict] = []
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def item_timeout(self) -> float:
        return max(1.0, min(self.timeout, self.left()))

    def item(self, name: str, fn: Callable[[], tuple[str, str | None, str | None]], skip: bool = False) -> bool:
        """Runs ``fn`` if the budget allows (``skip``: it only reports a skip, so it always runs)."""
        if self.only and name not in self.only:
            return False
        entry: dict = {"item": name}
        start = time.perf_counter()
        if self.left() < MIN_ITEM_SECONDS and not skip:
            entry.update(status="not run", seconds=0.0, figure=None,
                         error=f"the budget ({self.budget:.0f} s) was spent before it")  # fmt: skip
        else:
            print(f"[gpu_check] {name} ({self.left():.0f} s of the budget left) ...", flush=True)
            try:
                status, figure, error = fn()
            except Failed as e:
                status, figure, error = "fail", None, str(e)
                entry["log_tail"] = e.log[-3000:]
            except Exception as e:  # one broken item must not stop the others
                status, figure, error = "fail", None, f"{type(e).__name__}: {e}"[:400]
            entry.update(status=status, seconds=round(time.perf_counter() - start, 1), figure=figure, error=error)
        self.items.append(entry)
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s) {entry['figure'] or ''} "
              f"{entry['error'] or ''}", flush=True)  # fmt: skip
        self.write()
        return entry["status"] == "pass"

    def write(self) -> None:
        summary = {**self.header, "budget_s": self.budget, "seconds": round(time.perf_counter() - self.t0, 1)}
        summary["items"] = self.items
        (self.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
        title = f"# gpu_check on {summary['gpu']} (torch {summary['torch']}, CUDA {summary['cuda']})"
        lines = [f"{title}, {summary['seconds']} s of a {self.budget:.0f} s budget", ""]
        lines += ["| item | status | seconds | figure | error |", "|---" * 5 + "|"]
        for i in self.items:
            cells = [i["item"], i["status"], str(i["seconds"]), i["figure"] or "", i["error"] or ""]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


class Plan:
    """Every item's commands, built from the folders (the dry run checks exactly these)."""

    def __init__(self, work: Path, gpus: int) -> None:
        self.work, self.gpus = work, gpus
        runs = work / "runs"
        self.teacher = runs / "teacher" / "checkpoint"
        self.student = runs / "ddp_bf16" / "checkpoint"
        self.export_dir = work / "export"
        self.cache = work / "teacher_cache"
        t = f"teacher.checkpoint={self.teacher}"
        self.launches: dict[str, list[str] | None] = {
            "teacher": [*launch("single", 1, "train/train.py", TEACHER, runs / "teacher"), "train.epochs=1"],
        }
        for name, config, precision in (
            ("ddp_bf16", "ddp", "bf16"),
            ("ddp_fp16", "ddp", "fp16"),
            ("zero2_bf16", "zero2", "bf16"),
            ("zero3_bf16", "zero3", "bf16"),
        ):
            cmd = launch(config, 1, "train/distill.py", DISTILL, runs / name, t)
            self.launches[name] = [*cmd, f"train.mixed_precision={precision}", "train.epochs=1"]
        self.launches["qat"] = [*launch("ddp", 1, "train/distill.py", QAT, runs / "qat", t),
                                f"model.checkpoint={self.student}", "train.epochs=1"]  # fmt: skip
        cmd = launch("fsdp", 1, "train/distill.py", DISTILL, runs / "fsdp_bf16", t)
        self.launches["fsdp_bf16_resume"] = [*cmd, "train.mixed_precision=bf16", "train.epochs=2",
                                             "train.checkpoint_every=20"]  # fmt: skip
        cache = [t, f"cache.path={self.cache}", "train.epochs=1"]
        self.launches["cache_teacher"] = launch("single", 1, "train/cache_teacher.py", DISTILL, runs / "cache", *cache)
        self.launches["cached_teacher"] = [*launch("single", 1, "train/distill.py", DISTILL, runs / "cached", *cache),
                                           "train.teacher_placement=cached"]  # fmt: skip
        two = [t, "train.mixed_precision=bf16", "train.epochs=1"]
        self.launches["two_ranks"] = launch("ddp", 2, "train/distill.py", DISTILL, runs / "two", *two)
        self.launches["sharded_teacher"] = [*launch("ddp", 2, "train/distill.py", DISTILL, runs / "sharded", *two),
                                            "train.teacher_placement=sharded"]  # fmt: skip
        if gpus < 2:
            self.launches["two_ranks"] = self.launches["sharded_teacher"] = None

    def run_dir(self, name: str) -> Path:
        """The folder a training item's launch writes (its ``train.output_dir`` override)."""
        return Path(next(a for a in self.launches[name] if a.startswith("train.output_dir=")).split("=", 1)[1])

    def export(self, ckpt: Path, out: Path, *formats: str) -> list[str]:
        cmd = [sys.executable, "export/export.py", "--checkpoint", str(ckpt), "--out", str(out)]
        return [*cmd, "--formats", *formats] if formats else cmd

    def benchmark(self, runtimes: list[str], out: Path) -> list[str]:
        onnx = [str(self.export_dir / "model.onnx")] if any(r.startswith("ort") for r in runtimes) else []
        return [sys.executable, "export/benchmark.py", "--teacher", str(self.teacher), "--student", str(self.student),
                *onnx, str(self.export_dir / "model.ts"), "--runtimes", *runtimes,
                "--out", str(out), "--no-progress", "--batch-sizes", "1", "32", "256", "--rounds", "3",
                "--peak-seconds", "0.5", "--row-timeout", "120"]  # fmt: skip

    def gpu_tests(self) -> list[str]:
        return [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-x", "-p", "no:cacheprovider"]


def worker_cuda() -> int:
    """The ``cuda`` item: prints one JSON line."""
    import torch
    import torch.distributed as dist

    out: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ a
    end.record()
    torch.cuda.synchronize()
    out["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12, 1)
    conv = torch.nn.Conv2d(3, 16, 3).cuda()
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=dtype):
            y = conv(x)
        y.float().square().mean().backward()
        out[f"autocast_{str(dtype)[6:]}"] = f"{y.dtype}, grad finite {bool(torch.isfinite(x.grad).all())}"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for backend in ("nccl", "gloo"):
        os.environ["MASTER_PORT"] = str(29400 + (backend == "gloo"))
        try:
            dist.init_process_group(backend, rank=0, world_size=1, device_id=torch.device("cuda", 0))
            t = torch.full((4,), 2.0, device="cuda")
            dist.all_reduce(t)
            torch.cuda.synchronize()
            out[f"{backend}_all_reduce_cuda"] = f"ok ({t[0].item():g})"
        except Exception as e:
            out[f"{backend}_all_reduce_cuda"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    import onnxruntime as ort

    out["onnxruntime"] = f"{ort.__version__}: {', '.join(ort.get_available_providers())}"
    print(json.dumps(out))
    return 0


def worker_parity(ckpt: str, onnx_path: str, ts: str) -> int:
    """The ``cuda_parity`` item: prints one JSON line with each GPU runtime's parity to CPU eager."""
    import numpy as np
    import torch

    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.export.runtimes import get_runtime, runtime_class
    from slimforge.export.verify import run_batches
    from slimforge.train.checkpoint import read_meta
    from slimforge.train.models import ModelSpec

    meta = read_meta(ckpt)
    images = ValidationSet(data_config_from_meta(meta), 256).images_for(ModelSpec.from_dict(meta["model"]))
    plan = [64] * (len(images) // 64)
    images = images[: sum(plan)]

    def logits(runtime: str, path: str) -> np.ndarray:
        rt = get_runtime(runtime)(tf32=False, max_batch=64)
        rt.load(path)
        return run_batches(rt, images, plan)

    ref = logits("torch-eager", ckpt)
    out, skipped = {}, {}
    for runtime, path in (("torch-eager-cuda", ckpt), ("ort-cuda", onnx_path), ("torchscript-cuda", ts)):
        ok, why = runtime_class(runtime).available()
        if not ok:
            skipped[runtime] = why
            continue
        got = logits(runtime, path)
        out[runtime] = {
            "rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        }
    print(json.dumps({"parity": out, "skipped": skipped, "images": len(images), "gpu": torch.cuda.get_device_name(0)}))
    return 0


def fsdp_resume(check: Check, cmd: list[str], run_dir: Path):
    log = run_dir.parent / "fsdp_bf16_victim.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        victim = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    state = run_dir / "state" / "step_00000020" / "slimforge_state.json"
    deadline = time.time() + check.item_timeout() / 2
    while not state.exists():
        if victim.poll() is not None:
            text = log.read_text()
            raise Failed(f"the run ended (exit {victim.returncode}) before its first resumable state: "
                         f"{last_error(text)}", text)  # fmt: skip
        if time.time() > deadline:
            os.killpg(victim.pid, signal.SIGKILL)
            raise Failed("no resumable state within half the item's time", log.read_text())
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    checked([c for c in cmd if c != "train.overwrite=true"], check.item_timeout())
    s = json.loads((run_dir / "summary.json").read_text())
    if not s.get("resumed_from_step"):
        return "fail", None, "the relaunch started afresh instead of resuming"
    return "pass", f"resumed from step {s['resumed_from_step']}; " + summary_figure(run_dir), None


def run_items(check: Check, plan: Plan) -> None:
    gpus = plan.gpus

    def train(name: str):
        def fn():
            checked(plan.launches[name], check.item_timeout())
            return "pass", summary_figure(plan.run_dir(name)), None

        return fn

    def exported(ckpt: Path, out: Path, *formats: str):
        checked(plan.export(ckpt, out, *formats), check.item_timeout())
        report = json.loads((out / "export_report.json").read_text())
        figure = "; ".join(f"{a['file']} {a['status']} rel {a['parity']['rel_diff']:.1e}" for a in report["artifacts"])
        return ("pass" if report["passed"] else "fail"), figure, None

    def parity():
        text = checked([sys.executable, __file__, "--out", str(check.out), "--worker", "parity", str(plan.student),
                        str(plan.export_dir / "model.onnx"), str(plan.export_dir / "model.ts")],
                       check.item_timeout())  # fmt: skip
        result = json.loads(text.strip().splitlines()[-1])
        p = result["parity"]
        bad = {k: v for k, v in p.items() if v["rel_diff"] > 1e-4 or v["agreement"] < 0.99}
        figure = "; ".join(f"{k} rel {v['rel_diff']:.1e} agree {v['agreement']:.3f}" for k, v in p.items())
        figure += "".join(f"; {k} skipped: {v}" for k, v in result["skipped"].items())
        return ("fail" if bad else "pass"), figure, (f"over 1e-4 or under 0.99: {sorted(bad)}" if bad else None)

    def benchmark():
        from slimforge.export.runtimes import runtime_class

        runtimes = [r for r in GPU_RUNTIMES if runtime_class(r).available()[0]]
        unavailable = {r: runtime_class(r).available()[1] for r in GPU_RUNTIMES if r not in runtimes}
        out = plan.work / "benchmark"
        checked(plan.benchmark(runtimes, out), check.item_timeout())
        shutil.copy(out / "benchmark.md", check.out / "benchmark.md")
        report = json.loads((out / "benchmark.json").read_text())
        rows = [r for r in report["rows"] if r["device"] == "cuda" or r["runtime"] in GPU_RUNTIMES]
        figure = "; ".join(
            f"{r['runtime']} {r['model']} {r['precision']} "
            + (f"p50 {r['latency_ms']['p50']:.3f} ms ({r.get('speedup_p50') or 0:.1f}×)" if r["status"] == "ok"
               else r["status"])
            for r in rows
        )  # fmt: skip
        figure += "".join(f"; {k} skipped: {v}" for k, v in unavailable.items())
        failed = [f"{r['runtime']}: {r.get('reason')}" for r in rows if r["status"] not in ("ok", "skipped")]
        return ("fail" if failed else "pass"), figure, ("; ".join(failed)[:600] or None)

    def cuda():
        text = checked([sys.executable, __file__, "--out", str(check.out), "--worker", "cuda"], check.item_timeout())
        result = json.loads(text.strip().splitlines()[-1])
        bad = [k for k in ("nccl_all_reduce_cuda",) if not str(result[k]).startswith("ok")]
        figure = "; ".join(f"{k} {v}" for k, v in result.items())
        return ("fail" if bad else "pass"), figure, (f"{bad}" if bad else None)

    def cached():
        checked(plan.launches["cache_teacher"], check.item_timeout())
        checked(plan.launches["cached_teacher"], check.item_timeout())
        return "pass", summary_figure(plan.run_dir("cached_teacher")), None

    def gpu_tests():
        code, text = run(plan.gpu_tests(), check.item_timeout())
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        if code != 0:
            raise Failed(f"exit {code}: {tail[0]}", text)
        return "pass", tail[0], None

    def resumed(name: str):
        return lambda: fsdp_resume(check, plan.launches[name], plan.run_dir(name))

    def not_here():
        return "skipped", None, ONE_GPU.format(gpus=gpus)

    check.item("cuda", cuda)
    check.item("teacher", train("teacher"))
    check.item("ddp_bf16", train("ddp_bf16"))
    check.item("export", lambda: exported(plan.student, plan.export_dir, "onnx", "torchscript"))
    check.item("cuda_parity", parity)
    check.item("benchmark", benchmark)
    check.item("ddp_fp16", train("ddp_fp16"))
    check.item("qat", train("qat"))
    check.item("export_int8", lambda: exported(plan.run_dir("qat") / "checkpoint", plan.work / "export_int8"))
    check.item("zero2_bf16", train("zero2_bf16"))
    check.item("zero3_bf16", train("zero3_bf16"))
    check.item("fsdp_bf16_resume", resumed("fsdp_bf16_resume"))
    check.item("cached_teacher", cached)
    check.item("gpu_tests", gpu_tests)
    for name in ("two_ranks", "sharded_teacher"):
        missing = plan.launches[name] is None
        check.item(name, not_here if missing else train(name), skip=missing)


def dry_run(plan: Plan) -> list[str]:
    """Every item's setup checked without a GPU; the problems found (empty: all good)."""
    from slimforge.export.runtimes import runtime_class
    from slimforge.train.config import load_config
    from slimforge.train.schema import RunConfig

    problems = []
    for name, cmd in plan.launches.items():
        if cmd is None:
            continue
        launcher, launch_config = Path(cmd[0]), ROOT / cmd[cmd.index("--config_file") + 1]
        i = cmd.index("--config")
        for path in (launcher, launch_config, ROOT / cmd[i - 1], ROOT / cmd[i + 1]):
            if not path.exists():
                problems.append(f"{name}: {path} is missing")
        try:
            load_config(RunConfig, ROOT / cmd[i + 1], cmd[i + 2 :])
        except Exception as e:
            problems.append(f"{name}: {type(e).__name__}: {e}")
        print(f"[dry-run] {name}: {' '.join(cmd[1:])}")
    for runtime in GPU_RUNTIMES:
        try:
            runtime_class(runtime)
        except Exception as e:
            problems.append(f"benchmark: runtime {runtime}: {e}")
    commands = {
        "launcher": [plan.launches["teacher"][0], "launch", "--help"],
        "export": [*plan.export(plan.student, plan.export_dir)[:2], "--help"],
        "benchmark": [*plan.benchmark(GPU_RUNTIMES, plan.work)[:2], "--help"],
        "gpu_tests": [*plan.gpu_tests(), "--collect-only"],
    }
    for name, cmd in commands.items():
        code, text = run(cmd, 300)
        print(f"[dry-run] {name}: {' '.join(cmd[1:])} -> exit {code}")
        if code != 0:
            problems.append(f"{name}: exit {code}: {last_error(text)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_cuda() if args.worker[0] == "cuda" else worker_parity(*args.worker[1:])
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    if args.dry_run:
        problems = dry_run(Plan(work, 2))  # every launch, the 2-GPU ones too
        for p in problems:
            print(f"[dry-run] problem: {p}", file=sys.stderr)
        print(f"[dry-run] {'every item is ready' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a GPU machine.", file=sys.stderr)  # fmt: skip
        return NO_GPU
    out.mkdir(parents=True, exist_ok=True)
    install = ROOT / ".gpu_venv" / "install_report.json"
    header = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "install": json.loads(install.read_text()) if install.exists() else None,
    }
    check = Check(out, args.budget, args.item_timeout, args.only, header)
    run_items(check, Plan(work, header["gpus"]))
    check.write()
    print((out / "gpu_check.md").read_text())
    return 1 if any(i["status"] in ("fail", "not run") for i in check.items) else 0


if __name__ == "__main__":
    sys.exit(main())
