"""Video frames with PyAV: InternVL's segment sampling.

The video is cut into ``n`` equal segments; training draws ``n`` uniformly in [min_frames,
max_frames] and one random frame inside each segment, evaluation takes ``max_frames`` segments
and their centre frames. Videos shorter than ``n`` frames give all their frames. Each frame is
one tile; ``<video>`` becomes ``Frame-1: <image>\\nFrame-2: <image>\\n...``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtrain.data.conversation import IMAGE_PLACEHOLDER, SampleError
from vlmtrain.errors import UserError


def frame_placeholders(num_frames: int) -> str:
    return "".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))


def segment_indices(total: int, num_frames: int, rng: random.Random | None) -> list[int]:
    """One frame index per equal segment of ``total`` frames: random inside it (rng given) or its centre."""
    n = min(num_frames, total)
    bounds = np.linspace(0, total, n + 1).astype(int)
    if rng is None:
        return [int((a + b) // 2) for a, b in zip(bounds[:-1], bounds[1:])]
    return [rng.randrange(a, max(a + 1, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _open(src):
    import av

    try:
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))
    except FileNotFoundError:
        raise SampleError("missing_media", f"video not found: {src}") from None
    except Exception as e:  # PyAV raises its own error types for corrupt data
        name = "<bytes>" if isinstance(src, (bytes, bytearray)) else src
        raise SampleError("corrupt_media", f"cannot open video {name}: {e}") from None


def count_frames(src) -> int:
    """Frames of the first video stream: the container's count, else counted from packets (no decode)."""
    if not isinstance(src, (bytes, bytearray)) and not Path(src).exists():
        raise SampleError("missing_media", f"video not found: {src}")
    with _open(src) as container:
        if not container.streams.video:
            raise SampleError("corrupt_media", f"no video stream in {src if isinstance(src, str) else '<bytes>'}")
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        try:
            return sum(1 for p in container.demux(stream) if p.size)
        except Exception as e:
            raise SampleError("corrupt_media", f"cannot read video: {e}") from None


def read_frames(src, min_frames: int, max_frames: int, rng: random.Random | None) -> list[Image.Image]:
    """The sampled frames as RGB images, in time order. ``rng`` None: evaluation (segment centres)."""
    if not 1 <= min_frames <= max_frames:
        raise UserError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    if not isinstance(src, (bytes, bytearray)) and not Path(src).exists():
        raise SampleError("missing_media", f"video not found: {src}")
    total = count_frames(src)
    if total < 1:
        raise SampleError("corrupt_media", "video has no frames")
    n = rng.randint(min_frames, max_frames) if rng is not None else max_frames
    wanted = segment_indices(total, n, rng)
    want = set(wanted)
    frames: dict[int, Image.Image] = {}
    with _open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1]:
                    break
        except Exception as e:
            raise SampleError("corrupt_media", f"cannot decode video: {e}") from None
    if len(frames) < len(want):  # the container over-reported its frame count: use what decoded
        if not frames:
            raise SampleError("corrupt_media", "no frame of the video decodes")
    return [frames[i] for i in wanted if i in frames]
