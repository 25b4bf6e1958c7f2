"""Sliding-window inference that stitches a whole batch of images window by window, not image by image.

MONAI's ``sliding_window_inference`` (what ``SlidingWindowInferer`` runs) adds each window's output of each image
to the stitched map in a separate step, with its slice arithmetic redone in Python every time: for the detector's
six outputs that was 900 tensor operations per image (16 windows of a 384 px bitewing), and a service micro-batch
of 8 images paid it 8 times. :class:`BatchSlidingWindow` cuts every window of every image out with one slice per
window position, runs the network on the same chunks of windows as MONAI, and adds one window position of all
images at once, so the operations grow with the window positions, not with the images. The windows, the chunks,
the order of the additions and the final division are MONAI's (constant weights, inputs at least one window large),
so the stitched maps are MONAI's to the bit on the CPU (see the tests, which compare).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer


class BatchSlidingWindow(Inferer):
    """MONAI's ``SlidingWindowInferer(roi_size, sw_batch_size, overlap, mode="constant")`` for 2D inputs at least
    one window large in each side, for networks that return a tensor or a sequence of tensors.

    Unlike MONAI, which keeps one chunk of windows at a time, it holds the batch's windows and window outputs until
    they are stitched: for the tiny config's 16 windows per 384 px image, 1 MB of windows and less of outputs per
    image.

    Args:
        roi_size: side of the square window in pixels.
        sw_batch_size: windows per network call.
        overlap: fraction in [0, 1) by which neighbouring windows overlap.
    """

    def __init__(self, roi_size: int, sw_batch_size: int, overlap: float) -> None:
        super().__init__()
        if roi_size < 1 or sw_batch_size < 1 or not 0.0 <= overlap < 1.0:
            raise ValueError(
                f"need roi_size >= 1, sw_batch_size >= 1 and overlap in [0, 1), got {roi_size}, {sw_batch_size}, "
                f"{overlap}"
            )
        self.roi_size = roi_size
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self._counts: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Stitched network outputs for (B, C, H, W) ``inputs`` with H, W >= ``roi_size``.

        ``network(windows, *args, **kwargs)`` gets (N, C, roi, roi) windows and returns a (N, K, h, w) tensor or a
        sequence of them, each h = w = roi * s for its own scale s (the detector's pyramid levels). Returns the same
        structure with (B, K, H * s, W * s) maps: at every position the mean over the windows covering it.
        """
        if inputs.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) inputs, got shape {tuple(inputs.shape)}")
        images, _, height, width = inputs.shape
        roi = self.roi_size
        if height < roi or width < roi:
            raise ValueError(f"inputs must be at least one {roi} px window large, got {height} x {width}")
        positions = self._window_starts(height, width)
        windows = torch.stack([inputs[:, :, top : top + roi, left : left + roi] for top, left in positions], dim=1)
        # (B * n, C, roi, roi) image-major, as MONAI orders them, so the network sees MONAI's chunks.
        windows = windows.flatten(0, 1)
        chunks = [
            network(windows[first : first + self.sw_batch_size], *args, **kwargs)
            for first in range(0, windows.shape[0], self.sw_batch_size)
        ]
        single = isinstance(chunks[0], torch.Tensor)
        per_output = [[chunk] if single else list(chunk) for chunk in chunks]
        stitched = tuple(
            self._stitch(torch.cat(parts), images, positions, height, width, inputs.dtype)
            for parts in zip(*per_output, strict=True)
        )
        return stitched[0] if single else stitched

    def _window_starts(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners in MONAI's order (rows outer); its scan interval: ``int(roi * (1 - overlap))``, or the
        whole side when the image is exactly one window (MONAI's ``_get_scan_interval``)."""
        roi = self.roi_size
        interval = [roi if side == roi else max(int(roi * (1 - self.overlap)), 1) for side in (height, width)]
        slices = dense_patch_slices((height, width), (roi, roi), interval)
        return [(rows.start, columns.start) for rows, columns in slices]

    def _stitch(
        self,
        outputs: torch.Tensor,
        images: int,
        positions: Sequence[tuple[int, int]],
        height: int,
        width: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(B * n, K, h, w) window outputs -> (B, K, H * s, W * s) mean map, s = h / roi, in the inputs' dtype
        (MONAI's compute dtype)."""
        channels, out_height, out_width = outputs.shape[1:]
        scale = out_height / self.roi_size
        if out_width != out_height:
            raise ValueError(f"expected square window outputs, got {out_height} x {out_width}")
        outputs = outputs.view(images, len(positions), channels, out_height, out_width)
        total = torch.zeros(
            (images, channels, int(height * scale), int(width * scale)), dtype=dtype, device=outputs.device
        )
        # MONAI's _compute_coords: window corners scaled and truncated.
        roi = self.roi_size
        places = [
            (slice(int(top * scale), int((top + roi) * scale)), slice(int(left * scale), int((left + roi) * scale)))
            for top, left in positions
        ]
        for index, (rows, columns) in enumerate(places):
            total[:, :, rows, columns] += outputs[:, index]
        return total / self._count(places, total.shape[2:], dtype, outputs.device)

    def _count(
        self, places: list[tuple[slice, slice]], shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """(1, 1, h, w) windows covering each position, cached per layout (MONAI rebuilds it every call)."""
        layout = tuple((rows.start, rows.stop, columns.start, columns.stop) for rows, columns in places)
        key = (layout, tuple(shape), dtype, str(device))
        count = self._counts.get(key)
        if count is None:
            count = torch.zeros((1, 1, *shape), dtype=dtype, device=device)
            for rows, columns in places:
                count[:, :, rows, columns] += 1.0
            if len(self._counts) >= 64:  # a few layouts per service; bound it for callers of many sizes
                self._counts.clear()
            self._counts[key] = count
        return count
