"""Launched by test_data_launch.py under `accelerate launch` (2 CPU processes): an image folder is scanned by the
first process only and every rank holds the same splits; a folder that cannot be indexed fails on every rank with
the first process's error, instead of leaving the others waiting. The first process prints one JSON line per rank."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import datasets
from accelerate.utils import gather_object

import slimforge.train.data as data
from slimforge.train.engine.dataload import load_splits_once
from slimforge.train.engine.topology import build_accelerator
from slimforge.train.errors import DataError
from slimforge.train.schema import TrainConfig

scans = []
_index = data.index_image_folder


def counted(root):  # the real scan, counted
    scans.append(str(root))
    return _index(root)


data.index_image_folder = counted


def main(folder: str, broken: str) -> None:
    accelerator = build_accelerator(TrainConfig(output_dir=tempfile.mkdtemp(), tensorboard=False, cpu=True))
    splits = load_splits_once(data.DataConfig(source="imagefolder", path=folder, in_chans=1), accelerator)
    paths = [row["path"] for row in splits.train.cast_column("image", datasets.Image(decode=False))["image"]]
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    try:
        load_splits_once(data.DataConfig(source="imagefolder", path=broken, in_chans=1), accelerator)
        error = None
    except DataError as e:
        error = str(e)
    result = {"rank": accelerator.process_index, "scans": len(scans), "train": len(splits.train)}
    result |= {"val": len(splits.val), "classes": splits.class_names, "paths": digest, "error": error}
    for line in gather_object([json.dumps(result)]):  # a collective: both ranks' lines, printed by the first
        if accelerator.is_main_process:
            print(line, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
