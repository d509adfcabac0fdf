"""Data sources all become a Hugging Face `datasets.Dataset` with Image + ClassLabel columns."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from slimforge.train.data import DataConfig, build_loader, load_splits
from slimforge.train.errors import DataError


def test_embedded_mnist_is_a_real_hf_dataset_with_a_stratified_split():
    splits = load_splits(DataConfig(source="embedded", name="mnist_5k", in_chans=1))
    assert isinstance(splits.train, datasets.Dataset)
    assert isinstance(splits.train.features["image"], datasets.Image)
    assert isinstance(splits.train.features["label"], datasets.ClassLabel)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (4000, 1000, 10)
    assert np.bincount(splits.val["label"]).tolist() == [100] * 10  # stratified 20 %
    train_idx, val_idx = set(splits.train["__index__"]), set(splits.val["__index__"])
    assert not train_idx & val_idx and len(train_idx | val_idx) == 5000
    img = splits.train[0]["image"]
    assert isinstance(img, Image.Image) and img.size == (28, 28)
    assert np.asarray(img).max() > 100  # real strokes, not an empty canvas


def test_loader_yields_normalised_tensors_of_the_configured_size():
    cfg = DataConfig(source="embedded", name="digits", in_chans=1, image_size=16, batch_size=8, num_workers=0)
    splits = load_splits(cfg)
    batch = next(iter(build_loader(splits.train, cfg, is_training=True)))
    assert batch["pixel_values"].shape == (8, 1, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["label"].shape == (8,) and batch["index"].shape == (8,)
    val = next(iter(build_loader(splits.val, cfg, is_training=False)))
    assert -1.5 < val["pixel_values"].mean() < 1.5


def test_imagefolder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    splits = load_splits(DataConfig(source="imagefolder", path=str(tmp_path), val_fraction=0.3, image_size=8))
    assert splits.class_names == ["cat", "dog", "eel"]
    assert (len(splits.train), len(splits.val)) == (21, 9)


def test_missing_imagefolder_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "missing")))
    assert "does not exist" in info.value.problem and "data.path" in info.value.fix


def test_synthetic_data_is_seeded():
    cfg = DataConfig(source="synthetic", synthetic_samples=40, synthetic_classes=4, image_size=8)
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.num_classes == 4 and a.train["label"] == b.train["label"]


@pytest.mark.parametrize("folder", ["validation", "val"])
def test_an_image_folder_validates_on_its_validation_subfolder(tmp_path, caplog, folder):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), (folder, 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / split / cls / f"{split}{i}.png")
    cfg = DataConfig(source="imagefolder", path=str(tmp_path), image_size=8)
    with caplog.at_level("INFO", logger="slimforge.train.data"):
        splits = load_splits(cfg)
    assert (len(splits.train), len(splits.val)) == (12, 4)  # all of train/, none of it held out
    assert splits.class_names == ["cat", "dog"]
    assert "validation: 4 images from split 'validation'" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="slimforge.train.data"):
        held_out = load_splits(DataConfig(source="imagefolder", path=str(tmp_path / "train"), image_size=8))
    assert (len(held_out.train), len(held_out.val)) == (9, 3)  # no validation folder: 20 % held out, and said so
    assert "validation: 3 images held out of split 'train' (data.val_fraction 0.2)" in caplog.text


def test_the_folder_scan_reads_what_datasets_imagefolder_reads(tmp_path):
    """Same splits (folder names as `datasets` knows them), same class names, same (file, label) rows as
    `datasets.load_dataset("imagefolder")`, which is far slower on large folders (scripts/bench_data.py)."""
    from slimforge.train.imagefolder import scan_image_folder

    rng = np.random.default_rng(0)
    layout = {("train", "cat"): 3, ("train", "dog"): 2, ("train", "eel"): 2, ("val", "cat"): 1, ("val", "dog"): 2}
    for (split, cls), n in layout.items():
        (tmp_path / split / cls).mkdir(parents=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
            image.save(tmp_path / split / cls / (f"{i}.JPG" if i else f"{i}.png"))
        (tmp_path / split / cls / "notes.txt").write_text("not an image")
    ours = scan_image_folder(tmp_path)
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path))
    assert sorted(ours) == sorted(theirs) == ["train", "validation"]
    for split in ours:
        assert ours[split].features["label"].names == theirs[split].features["label"].names == ["cat", "dog", "eel"]

        def rows(ds):
            return sorted((Path(r["image"]["path"]).name, Path(r["image"]["path"]).parent.name, r["label"])
                          for r in ds.cast_column("image", datasets.Image(decode=False)))  # fmt: skip

        assert rows(ours[split]) == rows(theirs[split])
    assert np.asarray(ours["train"][0]["image"]).shape == (6, 6, 3)  # decoded from its path when read
    # Images in subfolders of a class folder belong to that class, as in torchvision's ImageFolder (datasets' own
    # loader drops every label when files sit at different depths).
    (tmp_path / "train" / "eel" / "more").mkdir()
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "train" / "eel" / "more" / "x.png")
    train = scan_image_folder(tmp_path)["train"]
    assert train.num_rows == 8 and train["label"].count(2) == 3


def test_two_folders_for_one_split_or_an_empty_split_are_clear_errors(tmp_path):
    from slimforge.train.imagefolder import scan_image_folder

    for name in ("val", "validation"):
        (tmp_path / name / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="two folders for split 'validation'"):
        scan_image_folder(tmp_path)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image") as info:
        scan_image_folder(empty)
    assert "<class>/<image>" in info.value.fix
