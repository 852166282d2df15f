"""Image folders (the ImageNet layout: <root>/train/<class>/<image>, <root>/val/<class>/<image>): listed, decoded
in parallel, and either loaded whole or streamed from disk one batch at a time.

`StreamedImages` stands where a dataset's (N, C, H, W) uint8 tensor would: indexing it with a slice or an index
tensor decodes those images (threads: PIL releases the GIL while it decodes and resizes), and `prefetch` decodes
the next batches while the current one trains. A training step sees the same uint8 batch either way, so a sweep
streams or loads without changing a single result (tests/test_data_scale.py).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch

from ncssl_tune.core.data_errors import content_error

PREFETCH = 2  # batches decoding ahead of the one that trains


def imagefolder_dirs(root: str) -> tuple[str, str] | None:
    """(train dir, test or val dir) under root, or None if either is missing."""
    test = next((d for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test is None:
        return None
    return os.path.join(root, "train"), os.path.join(root, test)


def list_images(root: str) -> tuple[list[list[tuple[str, int]]], tuple[str, ...]]:
    """([train samples, test samples], class names): samples are (path, class index), classes sorted by name.
    Raises DatasetError for class folders that differ between the splits or hold no images."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    dirs = imagefolder_dirs(root)
    # allow_empty: an empty class folder is named below instead of torchvision's error for the whole split
    folders = [ImageFolder(d, allow_empty=True) for d in dirs]
    train, test = (set(f.classes) for f in folders)
    if train != test:
        only = "; ".join(f"only in {os.path.basename(d)}/: {', '.join(sorted(c))}"
                         for d, c in zip(dirs, (train - test, test - train)) if c)
        raise content_error("imagefolder", root, f"the class folders differ ({only})",
                            "give train/ and the test split the same class folders")
    for d, f in zip(dirs, folders):
        counts = np.bincount(f.targets, minlength=len(f.classes))
        if counts.min() == 0:
            empty = os.path.join(d, f.classes[int(counts.argmin())])
            raise content_error("imagefolder", root, f"the class folder {empty} holds no images (files ending "
                                f"{', '.join(IMG_EXTENSIONS)})", "add images to it or remove the folder from "
                                "every split")
    return [f.samples for f in folders], tuple(folders[0].classes)


def count_images(root: str) -> tuple[int, int]:
    """(train images, test images) under root, without decoding any (for what a dataset will weigh)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    def count(d: str) -> int:
        return sum(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(d) for f in files)

    train, test = imagefolder_dirs(root)
    return count(train), count(test)


def read_image(path: str, size: int, root: str) -> np.ndarray:
    """One image file as (size, size, 3) uint8, whatever its size or mode (grey, palette, RGBA, CMYK)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, truncated, unreadable
        raise content_error("imagefolder", root, f"cannot read {path} as an image ({e})",
                            "remove the file or replace it with an intact image") from e


def decode(pool: ThreadPoolExecutor, paths: list[str], size: int, root: str) -> torch.Tensor:
    """The images at paths as one (n, 3, size, size) uint8 tensor, decoded on pool's threads."""
    return _stack([pool.submit(read_image, p, size, root) for p in paths], size)


def _stack(futures: list[Future], size: int) -> torch.Tensor:
    """(n, 3, S, S) contiguous uint8: one memory layout whether a batch was streamed or cut from the loaded set
    (a layout can change a convolution's rounding on the CPU)."""
    out = np.empty((len(futures), 3, size, size), np.uint8)
    for i, f in enumerate(futures):
        out[i] = f.result().transpose(2, 0, 1)
    return torch.from_numpy(out)


class StreamedImages:
    """N images on disk that index like an (N, 3, size, size) uint8 tensor on `device`, decoded when indexed.

    workers: decoding threads (a trial's CPUs). Picklable (the pool is made where it is used)."""

    dtype = torch.uint8

    def __init__(self, paths: list[str], size: int, root: str, workers: int, device: torch.device | str = "cpu"):
        self.paths, self.size, self.root, self.workers = paths, size, root, max(1, workers)
        self.device = torch.device(device)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

    def to(self, device: torch.device | str) -> StreamedImages:
        return StreamedImages(self.paths, self.size, self.root, self.workers, device)

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _paths(self, idx) -> list[str]:
        if isinstance(idx, slice):
            return self.paths[idx]
        return [self.paths[i] for i in torch.as_tensor(idx).tolist()]

    def _submit(self, idx) -> list[Future]:
        return [self.pool.submit(read_image, p, self.size, self.root) for p in self._paths(idx)]

    def _deliver(self, futures: list[Future]) -> torch.Tensor:
        x = _stack(futures, self.size)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def __getitem__(self, idx) -> torch.Tensor:
        """x[idx] for a slice or an index tensor/array: (n, 3, S, S) uint8 on the device."""
        return self._deliver(self._submit(idx))

    def prefetch(self, chunks: Iterable) -> Iterator[torch.Tensor]:
        """self[c] for each chunk c in order, with PREFETCH chunks decoding while the current one is used."""
        it = iter(chunks)
        pending: deque[list[Future]] = deque(self._submit(c) for c in islice(it, PREFETCH))
        try:
            while pending:
                current = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(self._submit(nxt))
                yield self._deliver(current)
        finally:  # an early stop (a diverged step, a stopped trial) leaves nothing decoding
            for futures in pending:
                for f in futures:
                    f.cancel()
