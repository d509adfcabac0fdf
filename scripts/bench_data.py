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

``--webdataset N`` measures training-loader throughput instead (:func:`bench_webdataset`): the same N JPEGs of
500×375 pixels as an image folder read by torchvision's ``ImageFolder`` + ``DataLoader`` and as WebDataset tar
shards read by slimforge's ``data.source: webdataset`` stream, the same timm training transform, batch and workers,
each epoch in a fresh process, rounds interleaved; it prints images/s of each and the ratio (target >= 0.95)::

    .venv/bin/python scripts/bench_data.py --webdataset 4000 --batch 64 --workers 2 --rounds 3
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
CPU = """
import resource
def cpu(loader=None):
    if loader is not None:  # the workers end with the epoch's iterator; their time counts once they are joined
        getattr(loader, "_iterator", None) and loader._iterator._shutdown_workers()
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))
"""
TV_LOADER = (
    CPU
    + """
import sys, time, torch
from torchvision.datasets import ImageFolder
from slimforge.train.data import DataConfig, build_transform
root, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = DataConfig(source="imagefolder", image_size=224, in_chans=3)
ds = ImageFolder(f"{root}/folder", transform=build_transform(cfg, is_training=True))
loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
t, c = time.perf_counter(), cpu()
n = sum(b[0].shape[0] for b in loader)
print(time.perf_counter() - t, n, cpu(loader) - c)
"""
)
WDS_LOADER = (
    CPU
    + """
import sys, time
from slimforge.train.data import DataConfig, build_loader, load_splits
root, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shards = {"train": f"{root}/shards/train-*.tar", "validation": f"{root}/shards/val-*.tar"}
cfg = DataConfig(source="webdataset", shards=shards, image_size=224, in_chans=3, batch_size=batch, num_workers=workers,
                 persistent_workers=False)
loader = build_loader(load_splits(cfg).train, cfg, is_training=True)  # the shard index is cached beside the shards
t, c = time.perf_counter(), cpu()
n = sum(b["pixel_values"].shape[0] for b in loader)
print(time.perf_counter() - t, n, cpu(loader) - c)
"""
)
SF_FOLDER = (
    CPU
    + """
import sys, time
from slimforge.train.data import DataConfig, build_loader, load_splits
root, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = DataConfig(source="imagefolder", path=f"{root}/folder", val_fraction=0.1, image_size=224, in_chans=3,
                 batch_size=batch, num_workers=workers, persistent_workers=False)
loader = build_loader(load_splits(cfg).train, cfg, is_training=True)
t, c = time.perf_counter(), cpu()
n = sum(b["pixel_values"].shape[0] for b in loader)
print(time.perf_counter() - t, n, cpu(loader) - c)
"""
)
WDS_INDEX = """
import sys, time
from slimforge.train.data import DataConfig, load_splits
shards = {"train": f"{sys.argv[1]}/shards/train-*.tar", "validation": f"{sys.argv[1]}/shards/val-*.tar"}
t = time.perf_counter()
s = load_splits(DataConfig(source="webdataset", shards=shards))
print(time.perf_counter() - t, len(s.train))
"""
HF_STREAM = (
    CPU
    + """
import sys, time, torch, datasets
from slimforge.train.data import DataConfig, build_transform
root, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
transform = build_transform(DataConfig(image_size=224, in_chans=3), is_training=True)
ds = datasets.load_dataset("webdataset", data_files={"train": f"{root}/shards/train-*.tar"}, split="train",
                           streaming=True).shuffle(seed=0, buffer_size=1000)
def view(row):
    return {"pixel_values": transform(row["jpg"].convert("RGB")), "label": int(row["cls"])}
ds = ds.map(view, remove_columns=["jpg", "cls", "__key__", "__url__"]).with_format("torch")
loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
t, c = time.perf_counter(), cpu()
n = sum(b["pixel_values"].shape[0] for b in loader)
print(time.perf_counter() - t, n, cpu(loader) - c)
"""
)
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


def photo_jpegs(root: Path, images: int, classes: int, per_shard: int = 250) -> None:
    """``images`` 500×375 JPEGs (smooth colour fields with grain, ~60 kB, ImageNet's typical size) written twice:
    ``root/folder/train/<class>/<i>.jpg`` and WebDataset shards ``root/shards/train-NNNNNN.tar`` (``<i>.jpg`` +
    ``<i>.cls``, the same bytes, classes interleaved), plus one small validation shard and ``classes.txt``."""
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "classes.txt").write_text("".join(f"c{c:03d}\n" for c in range(classes)))

    def member(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    tar = None
    for i in range(images):
        if i % per_shard == 0:
            tar and tar.close()
            tar = tarfile.open(root / "shards" / f"train-{i // per_shard:06d}.tar", "w")
        field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        grain = rng.normal(0, 12, (375, 500, 3))
        image = Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        c = i % classes
        (root / "folder" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        (root / "folder" / f"c{c:03d}" / f"{i:08d}.jpg").write_bytes(buf.getvalue())
        member(tar, f"{i:08d}.jpg", buf.getvalue())
        member(tar, f"{i:08d}.cls", str(c).encode())
        if i < classes:
            with tarfile.open(root / "shards" / "val-000000.tar", "a") as val:
                member(val, f"{i:08d}.jpg", buf.getvalue())
                member(val, f"{i:08d}.cls", str(c).encode())
    tar and tar.close()


def bench_webdataset(args: argparse.Namespace) -> int:
    """Training-loader images/s: torchvision ``ImageFolder`` + ``DataLoader`` against slimforge's WebDataset stream
    (and ``datasets``' WebDataset streaming with ``--with-hf-streaming``), on the same JPEGs."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder or tmp) / "loader_bench"
        start = time.perf_counter()
        photo_jpegs(root, args.webdataset, args.classes)
        size = sum(p.stat().st_size for p in (root / "folder").rglob("*.jpg")) / args.webdataset / 1e3
        shards = len(list((root / "shards").glob("train-*.tar")))
        print(f"wrote {args.webdataset} JPEGs of 500x375 ({size:.0f} kB on average) as a folder and as {shards} "
              f"shards in {time.perf_counter() - start:.0f} s")  # fmt: skip
        seconds, n = timed(WDS_INDEX, root)
        print(f"shard index of {n} images (built once, then read from beside the shards): {seconds:.2f} s")
        loaders = {"torchvision ImageFolder": TV_LOADER, "slimforge webdataset": WDS_LOADER}
        if args.with_indexed:  # slimforge's indexed path on the folder: what the per-sample seeded views cost
            loaders["slimforge imagefolder"] = SF_FOLDER
        if args.with_hf_streaming:
            loaders["datasets webdataset streaming"] = HF_STREAM
        # images/s of wall time, and images per CPU-second of the loader process and its workers: the work each
        # loader does, which a machine shared with other jobs does not distort as it does wall time.
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name, code in loaders.items():
                out = subprocess.run([sys.executable, "-c", code, str(root), str(args.batch), str(args.workers)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                seconds, n, cpu = (float(x) for x in out.stdout.split())
                rates[name].append((n / seconds, n / cpu))
                print(f"round {r + 1}: {name}: {n:.0f} images in {seconds:.2f} s: {n / seconds:.1f} images/s, "
                      f"{n / cpu:.1f} images per CPU-second")  # fmt: skip
        base = {k: statistics.median(v[k] for v in rates["torchvision ImageFolder"]) for k in (0, 1)}
        for name, values in rates.items():
            wall, cpu = (statistics.median(v[k] for v in values) for k in (0, 1))
            print(f"median {name}: {wall:.1f} images/s ({wall / base[0]:.3f} x torchvision), {cpu:.1f} images per "
                  f"CPU-second ({cpu / base[1]:.3f} x)")  # fmt: skip
        wall, cpu = (statistics.median(v[k] for v in rates["slimforge webdataset"]) / base[k] for k in (0, 1))
        print(f"slimforge webdataset / torchvision ImageFolder: {wall:.3f} in images/s, {cpu:.3f} in images per "
              f"CPU-second (target >= 0.95: {'met' if min(wall, cpu) >= 0.95 else 'MISSED'}); batch {args.batch}, "
              f"{args.workers} workers, 224 px timm training transform")  # fmt: skip
    return 0


def timed(code: str, folder: Path, *extra: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", code, str(folder), *extra], capture_output=True, text=True, check=True)
    seconds, n = out.stdout.split()
    return float(seconds), int(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200_000, help="training images (%(default)s)")
    p.add_argument("--classes", type=int, default=1000, help="class folders (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (%(default)s)")
    p.add_argument("--folder", help="where to write the folder (default: a temporary one, removed after)")
    p.add_argument("--with-datasets", type=int, default=0, metavar="N", help="also time datasets' loader on N images")
    p.add_argument("--webdataset", type=int, default=0, metavar="N", help="loader throughput on N JPEGs instead")
    p.add_argument("--batch", type=int, default=64, help="--webdataset: batch size (%(default)s)")
    p.add_argument("--workers", type=int, default=2, help="--webdataset: DataLoader workers (%(default)s)")
    p.add_argument("--with-hf-streaming", action="store_true", help="--webdataset: also datasets' streaming")
    p.add_argument("--with-indexed", action="store_true", help="--webdataset: also slimforge's image-folder loader")
    args = p.parse_args(argv)
    if args.webdataset:
        return bench_webdataset(args)
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
