"""How long an image folder takes to index: slimforge's load against torchvision's ImageFolder scan (and, on
request, ``datasets.load_dataset("imagefolder")``), measured side by side in interleaved rounds on one folder.

    .venv/bin/python scripts/bench_data.py --images 200000 --classes 1000 [--rounds 3] [--with-datasets 20000]

It writes a class-sorted folder under ``--folder`` (default a temporary one): ``train/<class>/<i>.jpg`` with
``--images`` small JPEGs and ``validation/<class>/`` with a tenth of that, every file the same 8×8 JPEG (indexing
never decodes). Each round times, in a fresh process each (no warm caches inside Python, the OS's directory cache
shared alike): torchvision's ``ImageFolder`` on ``train/`` and on ``validation/`` (its scan), and slimforge's
``load_splits`` (the scan, the ``datasets.Dataset`` of paths and labels, the index column). It prints the medians
and the ratio slimforge ÷ torchvision. ``--with-datasets N`` also times ``datasets.load_dataset("imagefolder")`` on
a folder of N images (it is slow: about 16 s per 20,000 files).
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCHVISION = """
import sys, time
from torchvision.datasets import ImageFolder
t = time.perf_counter()
n = sum(len(ImageFolder(f"{sys.argv[1]}/{s}").samples) for s in ("train", "validation"))
print(time.perf_counter() - t, n)
"""
SLIMFORGE = """
import sys, time
from slimforge.train.data import DataConfig, load_splits
t = time.perf_counter()
s = load_splits(DataConfig(source="imagefolder", path=sys.argv[1]))
print(time.perf_counter() - t, len(s.train) + len(s.val))
"""
DATASETS = """
import sys, time
import datasets
t = time.perf_counter()
d = datasets.load_dataset("imagefolder", data_dir=sys.argv[1])
print(time.perf_counter() - t, sum(len(x) for x in d.values()))
"""


def make_folder(root: Path, images: int, classes: int) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(buf, format="JPEG")
    data = buf.getvalue()
    for split, n in (("train", images), ("validation", max(classes, images // 10))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n * c // classes, n * (c + 1) // classes):
                (folder / f"{split}_{i:08d}.JPEG").write_bytes(data)


def timed(code: str, folder: Path) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    seconds, n = out.stdout.split()
    return float(seconds), int(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200_000, help="training images (%(default)s)")
    p.add_argument("--classes", type=int, default=1000, help="class folders (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (%(default)s)")
    p.add_argument("--folder", help="where to write the folder (default: a temporary one, removed after)")
    p.add_argument("--with-datasets", type=int, default=0, metavar="N", help="also time datasets' loader on N images")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder or tmp) / "folder"
        start = time.perf_counter()
        make_folder(root, args.images, args.classes)
        print(f"wrote {args.images} + {max(args.classes, args.images // 10)} JPEGs in {args.classes} classes in "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        tv, sf = [], []
        for r in range(args.rounds):
            t_tv, n_tv = timed(TORCHVISION, root)
            t_sf, n_sf = timed(SLIMFORGE, root)
            assert n_tv == n_sf, (n_tv, n_sf)
            tv.append(t_tv)
            sf.append(t_sf)
            print(f"round {r + 1}: torchvision ImageFolder {t_tv:.2f} s, slimforge load_splits {t_sf:.2f} s "
                  f"({n_sf} images)")  # fmt: skip
        m_tv, m_sf = statistics.median(tv), statistics.median(sf)
        verdict = "met" if m_sf <= 2 * m_tv + 2 else "MISSED"
        print(f"median: torchvision {m_tv:.2f} s, slimforge {m_sf:.2f} s: ratio {m_sf / m_tv:.2f}; the target is "
              f"slimforge <= 2 x torchvision + 2 s = {2 * m_tv + 2:.2f} s: {verdict}")  # fmt: skip
        if args.with_datasets:
            small = Path(tmp) / "small"
            make_folder(small, args.with_datasets, min(args.classes, args.with_datasets))
            t_ds, n_ds = timed(DATASETS, small)
            t_sf, _ = timed(SLIMFORGE, small)
            print(f"{n_ds} images: datasets.load_dataset('imagefolder') {t_ds:.2f} s, slimforge {t_sf:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
