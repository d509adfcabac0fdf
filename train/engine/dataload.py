"""The launch's data, indexed once: the first process scans an image folder, the others receive its index.

A directory scan of ImageNet (1.28 M files) takes seconds on a local disk and far longer on a shared file system,
where every rank scanning at once multiplies the metadata load by the world size. So the first process scans and
broadcasts the plain lists it found (paths, class indices, class names: about 100 MB for ImageNet, one broadcast
per launch), or the error it met, which every rank then raises alike, instead of the others waiting in a
collective for a rank that has left. Sources that are not folders load on every rank as before: the embedded
datasets are built in memory, and a hub dataset is cached by ``datasets`` itself.
"""

from __future__ import annotations

import logging
import time

from slimforge.train.data import DataConfig, Splits, index_folder, load_splits
from slimforge.train.errors import SlimforgeError

logger = logging.getLogger(__name__)


def load_splits_once(cfg: DataConfig, accelerator) -> Splits:
    """``cfg``'s splits on every rank of the launch, with an image folder scanned by the first process only.

    Raises:
        DataError: on every rank, when the first process could not index the folder.
    """
    from accelerate.utils import broadcast_object_list

    if cfg.source != "imagefolder" or accelerator.num_processes == 1:
        return load_splits(cfg)
    sent: list = [None]
    if accelerator.is_main_process:
        start = time.perf_counter()
        try:
            sent[0] = index_folder(cfg)
        except SlimforgeError as e:
            sent[0] = e
        else:
            logger.info(
                "indexed %s: %d images in %.1f s, once for the %d processes of this launch",
                cfg.path, len(sent[0]), time.perf_counter() - start, accelerator.num_processes,
            )  # fmt: skip
    broadcast_object_list(sent)  # a collective: every rank waits here for the first one's scan
    if isinstance(sent[0], SlimforgeError):
        raise sent[0]
    return load_splits(cfg, folder_index=sent[0])
