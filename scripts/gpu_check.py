"""Runs every GPU-only path of slimforge once on the embedded MNIST and writes ``OUT/gpu_check.{json,md}``.

    bash scripts/gpu_check.sh OUT          # the entry: sets up .venv on a GPU machine, then runs this

Items (each its own process, with a time limit; pass / fail / skipped, the figure, the error):

- ``teacher``: the resnet18 teacher, 1 epoch, single GPU (the other items distil from it).
- ``ddp_bf16``, ``ddp_fp16``: distillation under DDP (1 process per GPU) with bf16 / fp16 autocast.
- ``zero2_bf16``, ``zero3_bf16``: the same under DeepSpeed ZeRO-2 / ZeRO-3.
- ``fsdp_bf16_resume``: FSDP2 with bf16, SIGKILLed after its first resumable state, relaunched: it must resume.
- ``sharded_teacher``: the teacher sharded with FSDP2 across 2 GPUs (skipped with one GPU: NCCL refuses two
  ranks on one device).
- ``export``: ONNX + TorchScript export of the DDP bf16 student (parity-checked on the CPU by export.py).
- ``cuda_parity``: the same student's logits on the GPU in eager PyTorch, ONNX Runtime CUDA and TorchScript CUDA
  (TF32 off), each against eager FP32 on the CPU.
- ``benchmark``: the GPU rows of the benchmark (torch CUDA fp32/bf16/fp16/channels_last, ORT CUDA, TensorRT
  fp32/fp16, TorchScript CUDA) against the teacher on the same GPU.

Exit status: 0 every item passed or was skipped with its reason, 1 an item failed, 3 no CUDA GPU here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = 3
DISTILL = "configs/distill/mnist_resnet18_to_resnet10t.yaml"
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the runs")
    p.add_argument("--item-timeout", type=float, default=240, help="seconds one item may take (%(default)s)")
    p.add_argument("--only", nargs="+", help="run only these items (their prerequisites must have run)")
    p.add_argument("--parity", nargs=3, metavar=("CKPT", "ONNX", "TS"), help=argparse.SUPPRESS)  # one item's worker
    return p.parse_args(argv)


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def launch(config: str, processes: int, entry: str, run_config: str, out: Path, *overrides: str) -> list[str]:
    cmd = [bin_path("accelerate"), "launch", "--config_file", f"configs/accelerate/{config}.yaml"]
    cmd += ["--num_processes", str(processes), entry, "--config", run_config]
    return [*cmd, f"train.output_dir={out}", "train.tensorboard=false", "train.overwrite=true", *overrides]


def run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Runs ``cmd`` in the repository; ``(exit status, last lines of its output)``; 124 on timeout."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return 124, (out or "")[-2000:] + f"\n(killed after {timeout:g} s)"
    return proc.returncode, (out or "")[-2000:]


def last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1][:400]


def summary_figure(run_dir: Path) -> str:
    s = json.loads((run_dir / "summary.json").read_text())
    return (
        f"val_acc {s['val_acc']:.4f}, {s.get('steady_images_per_second') or 0:.0f} img/s steady, "
        f"compute {s.get('train_compute_dtype')}, {s.get('distributed_type')}"
    )


class Check:
    def __init__(self, out: Path, timeout: float, only: list[str] | None) -> None:
        self.out, self.timeout, self.only = out, timeout, only
        self.items: list[dict] = []

    def item(self, name: str, fn) -> bool:
        if self.only and name not in self.only:
            return True
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            status, figure, error = fn()
        except Exception as e:  # one broken item must not stop the others
            status, figure, error = "fail", None, f"{type(e).__name__}: {e}"[:400]
        entry = {"item": name, "status": status, "seconds": round(time.perf_counter() - start, 1)}
        entry.update(figure=figure, error=error)
        self.items.append(entry)
        print(f"[gpu_check] {name}: {status} ({entry['seconds']} s) {figure or ''} {error or ''}", flush=True)
        return status == "pass"

    def train(self, cmd: list[str], run_dir: Path):
        code, text = run(cmd, self.timeout)
        if code != 0:
            return "fail", None, f"exit {code}: {last_error(text)}"
        return "pass", summary_figure(run_dir), None


def training_commands(runs: Path, gpus: int) -> list[tuple[str, list[str] | None]]:
    """The training items' launch commands, in order (``None``: the item needs more GPUs than ``gpus``)."""
    teacher = runs / "teacher" / "checkpoint"
    cmds: list[tuple[str, list[str] | None]] = [
        ("teacher", [*launch("single", 1, "train/train.py", TEACHER, runs / "teacher"), "train.epochs=1"])
    ]
    for name, config, precision in (
        ("ddp_bf16", "ddp", "bf16"),
        ("ddp_fp16", "ddp", "fp16"),
        ("zero2_bf16", "zero2", "bf16"),
        ("zero3_bf16", "zero3", "bf16"),
    ):
        cmd = launch(config, 1, "train/distill.py", DISTILL, runs / name, f"teacher.checkpoint={teacher}")
        cmds.append((name, [*cmd, f"train.mixed_precision={precision}", "train.epochs=1"]))
    cmd = launch("fsdp", 1, "train/distill.py", DISTILL, runs / "fsdp_bf16", f"teacher.checkpoint={teacher}")
    cmds.append(
        ("fsdp_bf16_resume", [*cmd, "train.mixed_precision=bf16", "train.epochs=2", "train.checkpoint_every=20"])
    )
    cmd = launch("ddp", 2, "train/distill.py", DISTILL, runs / "sharded_teacher", f"teacher.checkpoint={teacher}")
    cmd += ["train.teacher_placement=sharded", "train.mixed_precision=bf16", "train.epochs=1"]
    cmds.append(("sharded_teacher", cmd if gpus >= 2 else None))
    return cmds


def fsdp_resume(check: Check, cmd: list[str], run_dir: Path):
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    state = run_dir / "state" / "step_00000020" / "slimforge_state.json"
    deadline = time.time() + check.timeout
    while not state.exists():
        if victim.poll() is not None:
            return "fail", None, f"the run ended (exit {victim.returncode}) before its first resumable state"
        if time.time() > deadline:
            os.killpg(victim.pid, signal.SIGKILL)
            return "fail", None, "no resumable state within the time limit"
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    resume = [c for c in cmd if c != "train.overwrite=true"]
    code, text = run(resume, check.timeout)
    if code != 0:
        return "fail", None, f"relaunch exit {code}: {last_error(text)}"
    s = json.loads((run_dir / "summary.json").read_text())
    if not s.get("resumed_from_step"):
        return "fail", None, "the relaunch started afresh instead of resuming"
    return "pass", f"resumed from step {s['resumed_from_step']}; " + summary_figure(run_dir), None


def cuda_parity(ckpt: str, onnx_path: str, ts: str) -> int:
    """Worker of the ``cuda_parity`` item: prints one JSON line with each GPU runtime's parity to CPU eager."""
    import numpy as np
    import torch

    from slimforge.export.evaldata import ValidationSet, data_config_from_meta
    from slimforge.export.runtimes import get_runtime
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
    out = {}
    for runtime, path in (("torch-eager-cuda", ckpt), ("ort-cuda", onnx_path), ("torchscript-cuda", ts)):
        got = logits(runtime, path)
        out[runtime] = {
            "rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
        }
    print(json.dumps({"parity": out, "images": len(images), "gpu": torch.cuda.get_device_name(0)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parity:
        return cuda_parity(*args.parity)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a GPU machine.", file=sys.stderr)  # fmt: skip
        return NO_GPU
    gpus = torch.cuda.device_count()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.item_timeout, args.only)
    runs = out / "runs"
    teacher = runs / "teacher" / "checkpoint"
    student = runs / "ddp_bf16" / "checkpoint"
    export = out / "export"
    t0 = time.perf_counter()

    trainings = training_commands(runs, gpus)
    for name, cmd in trainings:
        if name == "fsdp_bf16_resume":
            check.item(name, lambda cmd=cmd: fsdp_resume(check, cmd, runs / "fsdp_bf16"))
        elif cmd is None:
            check.item(name, lambda: ("skipped", None, f"needs 2 GPUs ({gpus} here): NCCL refuses two ranks on one "
                                                       "device"))  # fmt: skip
        else:
            check.item(name, lambda cmd=cmd, name=name: check.train(cmd, runs / name))

    def do_export():
        cmd = [sys.executable, "export/export.py", "--checkpoint", str(student), "--out", str(export)]
        code, text = run([*cmd, "--formats", "onnx", "torchscript"], check.timeout)
        if code != 0:
            return "fail", None, f"exit {code}: {last_error(text)}"
        report = json.loads((export / "export_report.json").read_text())
        figure = "; ".join(f"{a['file']} {a['status']} rel {a['parity']['rel_diff']:.1e}" for a in report["artifacts"])
        return ("pass" if report["passed"] else "fail"), figure, None

    check.item("export", do_export)

    def do_parity():
        code, text = run([sys.executable, __file__, "--out", str(out), "--parity", str(student),
                          str(export / "model.onnx"), str(export / "model.ts")], check.timeout)  # fmt: skip
        if code != 0:
            return "fail", None, f"exit {code}: {last_error(text)}"
        result = json.loads(text.strip().splitlines()[-1])
        bad = {k: v for k, v in result["parity"].items() if v["rel_diff"] > 1e-4 or v["agreement"] < 0.99}
        parity = result["parity"]
        figure = "; ".join(f"{k} rel {v['rel_diff']:.1e} agree {v['agreement']:.3f}" for k, v in parity.items())
        return ("fail" if bad else "pass"), figure, (f"over 1e-4 or under 0.99: {sorted(bad)}" if bad else None)

    check.item("cuda_parity", do_parity)

    def do_benchmark():
        cmd = [sys.executable, "export/benchmark.py", "--teacher", str(teacher), "--student", str(student),
               str(export / "model.onnx"), str(export / "model.ts"), "--runtimes", *GPU_RUNTIMES,
               "--out", str(out / "benchmark"), "--no-progress"]  # fmt: skip
        code, text = run(cmd, check.timeout)
        if code != 0:
            return "fail", None, f"exit {code}: {last_error(text)}"
        report = json.loads((out / "benchmark" / "benchmark.json").read_text())
        rows = [r for r in report["rows"] if r["device"] == "cuda" or r["runtime"] in GPU_RUNTIMES]
        figure = "; ".join(
            f"{r['runtime']} {r['model']} {r['precision']} "
            + (f"p50 {r['latency_ms']['p50']:.3f} ms ({r.get('speedup_p50') or 0:.1f}×)" if r["status"] == "ok"
               else r["status"])
            for r in rows
        )  # fmt: skip
        failed = [f"{r['runtime']}: {r['reason']}" for r in rows if r["status"] != "ok"]
        return ("fail" if failed else "pass"), figure, ("; ".join(failed)[:600] or None)

    check.item("benchmark", do_benchmark)

    summary = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "seconds": round(time.perf_counter() - t0, 1),
        "items": check.items,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"# gpu_check on {summary['gpu']} × {gpus} (torch {summary['torch']}, CUDA {summary['cuda']})"
    lines = [f"{title}, {summary['seconds']} s", "", "| item | status | seconds | figure | error |", "|---" * 5 + "|"]
    for i in check.items:
        cells = [i["item"], i["status"], str(i["seconds"]), i["figure"] or "", i["error"] or ""]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(i["status"] == "fail" for i in check.items) else 0


if __name__ == "__main__":
    sys.exit(main())
