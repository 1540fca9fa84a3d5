"""Episode videos: evaluation clips and the frames people label for human-feedback rewards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VIDEO_FPS = 20  # LIBERO's control frequency
MIN_VIDEO_SIDE = 128  # small model images are enlarged (nearest) so players show them


def write_video(frames: np.ndarray, path: Path) -> None:
    """(L+1, H, W, 3) uint8 -> H.264 MP4 at `path`, written to a hidden sibling and renamed into place.
    Debian's Chromium plays H.264 (checked in tests/integration/test_human_feedback.py)."""
    import imageio.v2 as imageio

    scale = max(1, -(-MIN_VIDEO_SIDE // frames.shape[1]))
    frames = frames.repeat(scale, 1).repeat(scale, 2) if scale > 1 else frames
    tmp = path.with_name(f".tmp-{path.name}")
    imageio.mimwrite(tmp, list(frames), fps=VIDEO_FPS, format="FFMPEG", codec="libx264", macro_block_size=16)
    os.replace(tmp, path)
