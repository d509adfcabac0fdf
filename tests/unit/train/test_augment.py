"""timm's augmentations and per-sample Mixup/CutMix: every view a pure function of (seed, epoch, sample)."""

from __future__ import annotations

import torch

from slimforge.train.data import ImageSamples, build_loader, load_splits, sample_seed
from tests.conftest import tiny_data_config

STRONG = dict(augment=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, translate=0.1, color_jitter=0.3)


def samples(seed: int = 7, **kw) -> ImageSamples:
    data = tiny_data_config(max_train_samples=64, **{**STRONG, **kw})
    return ImageSamples(load_splits(data).train, data, is_training=True, seed=seed)


def test_the_sample_seed_is_a_fixed_function():
    # Fixed values: the seed must not depend on Python's hash randomisation, version or process.
    assert sample_seed(0, 0, 0) == sample_seed(0, 0, 0) == 821666738
    assert len({sample_seed(0, e, i) for e in range(3) for i in range(100)}) == 300


def test_views_repeat_for_the_same_seed_epoch_and_sample_and_differ_otherwise():
    a, b = samples(), samples()
    for key in [(0, 3), (2, 3), (1, 40)]:
        assert torch.equal(a[key]["pixel_values"], b[key]["pixel_values"])  # another instance, another time
    assert not torch.equal(a[(0, 3)]["pixel_values"], a[(1, 3)]["pixel_values"])  # another epoch
    assert not torch.equal(a[(0, 3)]["pixel_values"], samples(seed=8)[(0, 3)]["pixel_values"])  # another seed
    # Global random state is left as it was (the loader's other users are not disturbed).
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    a[(0, 5)]
    assert torch.equal(torch.rand(1), before)


def test_mixup_and_cutmix_give_soft_targets_and_repeat():
    mixed = samples(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=1.0)
    seen_two = 0
    for i in range(16):
        item = mixed[(1, i)]
        t = item["target"]
        assert t.shape == (10,) and abs(float(t.sum()) - 1.0) < 1e-6 and t[item["label"]] > 0
        seen_two += int((t > 0).sum() == 2)
        again = mixed[(1, i)]
        assert torch.equal(item["pixel_values"], again["pixel_values"]) and torch.equal(t, again["target"])
    assert seen_two >= 8  # most partners carry another digit
    plain = samples(mix_prob=0.0, mixup_alpha=0.4)[(1, 0)]
    assert plain["target"].max() == 1.0


def test_a_mixed_batch_collates_with_its_epoch_and_indices():
    data = tiny_data_config(max_train_samples=64, batch_size=8, mixup_alpha=0.2, **STRONG)
    loader = build_loader(load_splits(data).train, data, is_training=True, seed=3)
    loader.sampler.set_epoch(2)
    b = next(iter(loader))
    assert b["pixel_values"].shape == (8, 1, 32, 32) and b["target"].shape == (8, 10)
    assert b["epoch"].tolist() == [2] * 8 and len(set(b["index"].tolist())) == 8


def test_bad_augmentation_settings_are_named():
    problems = tiny_data_config(auto_augment="rand-m9-foo3", re_prob=2, translate=0.7, crop_ratio=[2, 1]).validate()
    text = " | ".join(problems)
    assert "auto_augment: 'rand-m9-foo3' is not a timm policy" in text and "re_prob: 2" in text
    assert "translate: 0.7" in text and "crop_ratio: [2, 1]" in text
