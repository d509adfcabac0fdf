"""Every subset that decides something is a seeded class-stratified sample, the same in every process: on an
image folder whose rows are sorted by class (train/ and validation/ of 100 classes, as ImageNet's are), the first N
rows would be one or two classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from slimforge.export.evaldata import ValidationSet
from slimforge.train.data import DataConfig, load_splits
from slimforge.train.engine.compression import calibration_batches
from slimforge.train.sampling import stratified_indices

CLASSES = 100


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """train/ (8 images per class) and validation/ (6 per class), 100 classes; each image's pixels carry its class
    so batches can be traced back to classes."""
    root = tmp_path_factory.mktemp("folder100")
    for split, n in (("train", 8), ("validation", 6)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), c, dtype=np.uint8)).save(folder / f"{i}.png")
    return DataConfig(source="imagefolder", path=str(root), image_size=8, in_chans=1, mean=[0.0], std=[1.0],
                      batch_size=32)  # fmt: skip


def test_the_folder_is_sorted_by_class_so_first_rows_would_be_one_class(sorted_folder):
    splits = load_splits(sorted_folder)
    assert splits.num_classes == CLASSES and len(splits.val) == 600
    assert len(set(splits.val["label"][:500])) == 84 and len(set(splits.train["label"][:8])) == 1  # the bias


def test_calibration_with_512_images_covers_every_class(sorted_folder):
    splits = load_splits(sorted_folder)
    batches = list(calibration_batches(splits.train, sorted_folder)(512))
    images = torch.cat(batches)
    assert images.shape[0] == 512
    classes = torch.round(images[:, 0, 0, 0] * 255).long()  # the pixel value is the class
    counts = torch.bincount(classes, minlength=CLASSES)
    assert (counts >= 5).all() and (counts <= 6).all() and counts.sum() == 512
    again = torch.cat(list(calibration_batches(splits.train, sorted_folder)(512)))
    assert torch.equal(images, again)  # the same images in every process


def test_the_benchmarks_500_images_are_5_of_each_class(sorted_folder):
    val = ValidationSet(sorted_folder, 500)
    assert np.bincount(val.labels.numpy(), minlength=CLASSES).tolist() == [5] * CLASSES
    assert val.coverage == "500 images of 100 classes, sampled from 600" and val.sampled
    assert ValidationSet(sorted_folder, 500).labels.tolist() == val.labels.tolist()
    whole = ValidationSet(sorted_folder, None)
    assert len(whole) == 600 and whole.coverage == "600 images of 100 classes" and not whole.sampled


def test_stratified_indices_are_balanced_seeded_and_stratified_in_every_prefix():
    labels = np.repeat(np.arange(7), [50, 3, 20, 20, 1, 40, 9])
    idx = stratified_indices(labels, 30, seed=1)
    assert len(idx) == len(set(idx)) == 30
    counts = np.bincount(labels[idx], minlength=7)
    assert counts[4] == 1 and counts[1] == 3  # small classes give all they have, the rest share the remainder
    assert counts.max() - counts[[0, 2, 3, 5, 6]].min() <= 1
    assert len(set(labels[idx[:7]])) == 7  # the first round holds every class
    assert idx == stratified_indices(labels, 30, seed=1) and idx != stratified_indices(labels, 30, seed=2)
    assert sorted(stratified_indices(labels, 1000)) == list(range(len(labels)))
