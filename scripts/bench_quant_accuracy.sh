#!/usr/bin/env bash
# bash scripts/bench_quant_accuracy.sh runs/mnist
# Int8 accuracy on the embedded MNIST-5k (1,000 validation digits), for a ResNet student and a depthwise one:
# the FP32 student vs post-training quantisation with each calibrator (minmax, percentile, entropy) vs
# quantisation-aware training with the teacher, every int8 file run in ONNX Runtime's integer kernels.
# Needs the demo's teacher and ResNet-10-T student in RUN (bash scripts/demo.sh, or scripts/pipeline.sh RUN).
# Prints one table per student; the benchmark report is in RUN/quant/benchmark/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/mnist}
BIN=.venv/bin
NPROC=$($BIN/python -c "import torch; print(torch.cuda.device_count() or 2)")
for need in "$RUN/teacher/checkpoint" "$RUN/student/checkpoint"; do
  [ -f "$need/slimforge.json" ] || { echo "error: $need is missing; run bash scripts/pipeline.sh $RUN first" >&2; exit 2; }
done
t0=$SECONDS
launch() { $BIN/accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NPROC" "$@"; }

if [ ! -f "$RUN/student_mbv3/checkpoint/slimforge.json" ]; then
  echo "== distil the depthwise student ($RUN/student_mbv3)"
  launch train/distill.py --config configs/distill/mnist_resnet18_to_mobilenetv3.yaml \
    teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$RUN/student_mbv3" train.overwrite=true
fi
for s in student student_mbv3; do
  Q="$RUN/quant/$s"
  # Its own QAT run of the unpruned student (the demo's student_qat starts from the pruned one).
  if [ ! -f "$Q/qat_run/checkpoint/slimforge.json" ]; then
    echo "== quantisation-aware training of $s with the teacher ($Q/qat_run)"
    launch train/distill.py --config configs/distill/mnist_resnet10t_qat.yaml model.checkpoint="$RUN/$s/checkpoint" \
      teacher.checkpoint="$RUN/teacher/checkpoint" train.output_dir="$Q/qat_run" train.overwrite=true
  fi
  echo "== export $s: FP32, post-training int8 with each calibrator, QAT int8 ($Q)"
  $BIN/python export/export.py --checkpoint "$RUN/$s/checkpoint" --out "$Q/fp32" --formats onnx --max-images 1000
  for c in minmax percentile entropy; do
    # A PTQ file that fails its int8 checks is kept as .failed and still measured below: exit 1 is reported, not fatal.
    $BIN/python export/export.py --checkpoint "$RUN/$s/checkpoint" --out "$Q/ptq_$c" --formats onnx-int8 \
      --calibrator "$c" --calibration-images 512 --max-images 1000 || echo "(ptq $c: see $Q/ptq_$c/export_report.json)"
  done
  $BIN/python export/export.py --checkpoint "$Q/qat_run/checkpoint" --out "$Q/qat" --formats onnx-qdq --max-images 1000
done

echo "== accuracy of every file in ONNX Runtime on the 1,000 validation digits ($RUN/quant/benchmark)"
FILES=()
for s in student student_mbv3; do
  Q="$RUN/quant/$s"
  FILES+=("$Q/fp32/model.onnx@ort-cpu")
  for c in minmax percentile entropy; do
    f="$Q/ptq_$c/model.int8.onnx"; [ -f "$f" ] || f="$f.failed"
    [ -f "$f" ] && FILES+=("$f@ort-cpu")
  done
  FILES+=("$Q/qat/model.int8.onnx@ort-cpu")
done
$BIN/python export/benchmark.py --teacher "$RUN/teacher/checkpoint" --student "${FILES[@]}" \
  --out "$RUN/quant/benchmark" --max-images 1000 --runs 50 --batch-sizes 1 8 --no-progress > /dev/null
$BIN/python - "$RUN" <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = json.loads((run / "quant/benchmark/benchmark.json").read_text())["rows"]
for s in ("student", "student_mbv3"):
    q = run / "quant" / s
    mine = [r for r in rows if f"/quant/{s}/" in r["artifact"]]
    fp32 = next(r for r in mine if r["artifact"].endswith("fp32/model.onnx"))
    print(f"\n{fp32['model']} ({s}): FP32 ONNX accuracy {fp32['accuracy']:.4f}, p50 {fp32['latency_ms']['p50']:.3f} ms")
    print("| file | accuracy | vs FP32 (points) | ORT int8 vs fake-quant top-1 | emulated rel diff | int8 MACs | p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in mine:
        if r is fp32:
            continue
        kind = Path(r["artifact"]).parent.name
        report = json.loads((q / kind / "export_report.json").read_text())["artifacts"][0]
        checks = report.get("checks") or {}
        print(
            f"| {kind} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - fp32['accuracy']):+.1f} | "
            f"{checks['deployed']['top1_agreement']:.4f} | {checks['emulated']['rel_diff']:.1e} | "
            f"{report.get('int8_mac_fraction') or 0:.1%} | {r['latency_ms']['p50']:.3f} |"
        )
PY
echo "== done in $((SECONDS - t0)) s"
