"""Memory of the benchmark's accuracy pass: streaming the validation split holds one batch, materialising it grows
with the split (0.6 MB per 224-px RGB image as floats: 30 GB for ImageNet's 50,000).

    python scripts/bench_eval_memory.py                     # 256 and 1024 images, 224 px, batches of 32
    python scripts/bench_eval_memory.py --sizes 512 2048 --batch-size 64

Writes an image folder of random 320×240 JPEGs (10 classes) per size into a temporary folder, then measures, each in
a fresh process, the peak resident memory (VmHWM) that reading the whole validation split through a 224-px eval
transform adds to a process that has loaded the dataset: ``ValidationSet.batches`` (what every benchmark row does)
against ``ValidationSet.images_for`` (the whole split in one tensor, what rows did before). Prints one table row per
size and way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(folder: str, way: str, batch_size: int) -> dict:
    from slimforge.export.evaldata import ValidationSet
    from slimforge.train.data import DataConfig
    from slimforge.train.models import ModelSpec

    cfg = DataConfig(source="imagefolder", path=folder, in_chans=3)
    val = ValidationSet(cfg)
    spec = ModelSpec(source="timm", name="any", num_classes=len(val.class_names), input_size=[3, 224, 224])
    next(val.batches(spec, 1))  # decoders and transforms warmed up, outside the measured stretch
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _peak_kb()
    if way == "stream":
        seen = sum(len(b) for b in val.batches(spec, batch_size))
    else:
        seen = len(val.images_for(spec))
    return {"images": seen, "added_mb": (_peak_kb() - before) / 1024}


def make_folder(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("validation", n)):
        for i in range(count):
            folder = root / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 1024], help="validation images per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--child", nargs=2, metavar=("FOLDER", "WAY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.batch_size)))
        return 0
    print("| images | way | peak memory added (MB) | floats of the split (MB) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="slimforge-evalmem-") as tmp:
        for n in args.sizes:
            folder = Path(tmp) / str(n)
            make_folder(folder, n)
            for way in ("stream", "materialise"):
                cmd = [sys.executable, __file__, "--child", str(folder), way, "--batch-size", str(args.batch_size)]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                floats = out["images"] * 3 * 224 * 224 * 4 / 2**20
                print(f"| {out['images']} | {way} | {out['added_mb']:.0f} | {floats:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
