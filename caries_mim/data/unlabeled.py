"""Unlabeled radiographs for masked image modeling: every readable file under some folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from caries_mim.data.cache import DecodeCache, RadiographLoader
from caries_mim.data.discovery import find_radiographs
from caries_mim.data.indexing import IndexedImage, SkippedFiles, index_readable
from caries_mim.data.transforms import SPACING_FIELD, reseed_for_worker
from caries_mim.errors import InvalidDatasetError
from caries_mim.io import ReadOptions

#: An albumentations-style image transform: ``transform(image=array)["image"]``.
ImageTransform = Callable[..., dict[str, Any]]


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W) float array in [0, 1] -> contiguous float32 tensor (1, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).unsqueeze(0)


class UnlabeledRadiographs(Dataset):
    """Every readable radiograph under ``roots``, as float32 tensors (1, H, W) in [0, 1].

    Construction finds the files (:func:`~caries_mim.data.discovery.find_radiographs`) and decodes each once
    through the cache (:func:`~caries_mim.data.indexing.index_readable`, which explains why); unreadable files are
    left out with one summarized warning and recorded in :attr:`skipped`. With a transform (for example
    :func:`~caries_mim.data.transforms.mim_pretrain_transform`) H and W are the transform's output size.

    Args:
        roots: folder(s) or file(s) to scan.
        cache: decode cache; strongly advised for training (without it every epoch decodes every file).
        options: how files are read (modality allow-list, size limit).
        transform: albumentations-style callable applied to the (H, W) float32 image.
        views: augmented views per item. 1: items are (1, H, W). 2 (two-view, contrastive objectives): items are
            (2, 1, H, W), the transform applied twice to one decoded image (decode once, augment twice).
        progress: show a tqdm bar during the validation pass.
    Raises:
        InvalidDatasetError: a root does not exist, or not one readable radiograph was found.
    """

    def __init__(
        self,
        roots: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        cache: DecodeCache | None = None,
        options: ReadOptions | None = None,
        transform: ImageTransform | None = None,
        views: int = 1,
        progress: bool = True,
    ) -> None:
        if views < 1 or (views > 1 and transform is None):
            raise ValueError(f"views must be >= 1, and more than one needs a transform to tell them apart; got {views}")
        self.views = views
        root_list = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(root) for root in roots]
        self.load = RadiographLoader(cache, options or ReadOptions())
        self.transform = transform
        self._transform_seed: int | None = None
        candidates = find_radiographs(root_list)
        self.images: list[IndexedImage]
        self.skipped: SkippedFiles
        self.images, self.skipped = index_readable(candidates, self.load, progress=progress)
        if not self.images:
            folders = ", ".join(str(root) for root in root_list)
            found = f"{len(candidates)} candidate file(s), none readable" if candidates else "no radiograph files"
            raise InvalidDatasetError(f"no readable radiographs in {folders} ({found})")

    @property
    def paths(self) -> list[Path]:
        return [image.path for image in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """float32 tensor (1, H, W) in [0, 1] (the transform's range when it changes intensities), or
        (views, 1, H, W) with several views.

        ``key`` is an index, or ``(index, augmentation_seed)`` as
        :class:`~caries_mim.data.sampling.ResumableEpochSampler` yields: the transform is then seeded for this
        item alone (the views follow each other in its stream), so its augmentation does not depend on worker count
        or iteration history.
        """
        index, seed = key if isinstance(key, tuple) else (key, None)
        radiograph = self.load(self.images[index].path)
        pixels = radiograph.pixels
        if self.transform is None:
            return image_tensor(pixels)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        else:
            self._transform_seed = reseed_for_worker(self.transform, self._transform_seed)
        # A spacing-aware transform (mim_pretrain_transform at a working spacing) reads it; others ignore it.
        views = [
            image_tensor(self.transform(image=pixels, **{SPACING_FIELD: radiograph.spacing_mm})["image"])
            for _ in range(self.views)
        ]
        return views[0] if self.views == 1 else torch.stack(views)
