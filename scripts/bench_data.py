"""How long an image folder takes to index, and how fast its training loader runs: slimforge against torchvision's
ImageFolder, measured side by side in interleaved rounds on one folder.

    .venv/bin/python scripts/bench_data.py --images 200000 --classes 1000 [--rounds 3] [--with-datasets 20000]
    .venv/bin/python scripts/bench_data.py --loader 1500 [--rounds 5] [--workers 2] [--batch 64]

Loader (``--loader N``): N JPEGs of 500×375 (smooth gradients plus noise, quality 90) in 10 classes; each round
runs one epoch of torchvision ``ImageFolder`` + ``DataLoader`` and one of slimforge's training loader
(``build_loader``: ``datasets`` rows, per-sample seeded views), alternately, both with the same timm train
transform (224 px random-resized crop, scale 0.08–1, flip) built by slimforge, the same batch size and worker count,
fresh workers every epoch. It prints images/s of each per round and the median of the per-round ratios.

Index:

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


def make_jpegs(root: Path, images: int, classes: int = 10) -> None:
    """``images`` photo-sized JPEGs (500×375) under ``root/<class>/``: what a loader decodes in a real dataset."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([x * 255 / 500, y * 255 / 375, (x + y) * 255 / 875], -1)
    for i in range(images):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def loader_rounds(root: Path, rounds: int, workers: int, batch: int) -> None:
    """Images/s of torchvision's ImageFolder + DataLoader and of slimforge's loader, alternately, one epoch each."""
    import torch
    from torchvision.datasets import ImageFolder

    from slimforge.train.data import DataConfig, build_loader, build_transform, load_splits

    cfg = DataConfig(
        source="imagefolder", path=str(root), image_size=224, in_chans=3, crop_scale=[0.08, 1.0],
        crop_ratio=[3 / 4, 4 / 3], hflip=0.5, batch_size=batch, num_workers=workers, persistent_workers=False,
    )  # fmt: skip
    train = load_splits(cfg).train  # 80% of the folder; torchvision reads the same number of images below
    torchvision_set = ImageFolder(str(root), transform=build_transform(cfg, is_training=True))
    subset = torch.utils.data.Subset(torchvision_set, range(len(train)))

    def epoch(loader) -> float:
        start, n = time.perf_counter(), 0
        for batch_ in loader:
            n += len(batch_[1] if isinstance(batch_, (list, tuple)) else batch_["label"])
        return n / (time.perf_counter() - start)

    ratios = []
    for r in range(rounds):
        tv = epoch(torch.utils.data.DataLoader(subset, batch, shuffle=True, num_workers=workers, drop_last=True))
        loader = build_loader(train, cfg, is_training=True, seed=0)
        loader.sampler.set_epoch(r)
        sf = epoch(loader)
        ratios.append(sf / tv)
        print(f"round {r + 1}: torchvision {tv:.0f} img/s, slimforge {sf:.0f} img/s: ratio {sf / tv:.3f}", flush=True)
    m = statistics.median(ratios)
    print(f"median ratio slimforge / torchvision over {rounds} rounds: {m:.3f} (target >= 0.95: "
          f"{'met' if m >= 0.95 else 'MISSED'}); {len(train)} images a round, batch {batch}, "
          f"{workers} workers")  # fmt: skip


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
    p.add_argument("--loader", type=int, default=0, metavar="N", help="time the training loader on N JPEGs instead")
    p.add_argument("--workers", type=int, default=2, help="loader: DataLoader workers (%(default)s)")
    p.add_argument("--batch", type=int, default=64, help="loader: batch size (%(default)s)")
    args = p.parse_args(argv)
    if args.loader:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.folder or tmp) / "jpegs"
            make_jpegs(root, args.loader)
            loader_rounds(root, args.rounds, args.workers, args.batch)
        return 0
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
