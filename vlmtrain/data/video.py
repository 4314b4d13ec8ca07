"""Video frames with PyAV, sampled by the makers' rules.

Training (InternVL's ``get_frame_indices(sample='rand')``, the only rule its finetune script uses):
the frame count ``n`` is drawn per sample in [min_frames, max_frames], both inclusive; the video is
cut into ``min(n, vlen)`` segments at ``linspace(0, vlen, segments + 1)``, and one frame is drawn
per segment, never the segment's last frame (a two-frame segment always gives its first); when
any segment is a single frame, the draw is a sorted random subset of all frames instead.

Evaluation and chat (the InternVL model card's ``get_index``): ``seg = (vlen - 1) / n`` and
frame ``i`` is ``int(seg / 2 + round(seg * i))``, with numpy's (banker's) rounding.

Either way a video shorter than ``n`` frames gives ``n`` frames, its last frame repeated, as the
reference's decord reader returns them. Each frame is one tile; the text gets one
``Frame-i: <image>`` line per frame (``vlmtrain.data.placeholders.frame_lines``).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtrain.data.conversation import SampleError
from vlmtrain.errors import UserError


def training_frame_indices(vlen: int, num_frames: int, rng: random.Random) -> list[int]:
    """The training draw: ``num_frames`` indices into a video of ``vlen`` frames, in time order."""
    segments = min(num_frames, vlen)
    bounds = np.linspace(0, vlen, segments + 1).astype(int).tolist()
    if all(b - a >= 2 for a, b in zip(bounds[:-1], bounds[1:])):
        # the reference draws from range(start, next_start - 1): a segment's last frame never comes
        indices = [rng.randrange(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        indices = sorted(rng.sample(range(vlen), segments))
    return _pad(indices, num_frames)


def inference_frame_indices(vlen: int, num_frames: int) -> list[int]:
    """The model card's ``get_index`` over the whole video (no time bound)."""
    seg = (vlen - 1) / num_frames
    return [int(seg / 2 + np.round(seg * i)) for i in range(num_frames)]


def _pad(indices: list[int], num_frames: int) -> list[int]:
    return indices + [indices[-1]] * (num_frames - len(indices))


def _open(src):
    import av

    try:
        return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))
    except FileNotFoundError:
        raise SampleError("missing_media", f"video not found: {src}") from None
    except Exception as e:  # PyAV raises its own error types for corrupt data
        name = "<bytes>" if isinstance(src, (bytes, bytearray)) else src
        raise SampleError("corrupt_media", f"cannot open video {name}: {e}") from None


def _check_exists(src) -> None:
    if not isinstance(src, (bytes, bytearray)) and not Path(src).exists():
        raise SampleError("missing_media", f"video not found: {src}")


def count_frames(src) -> int:
    """Frames of the first video stream: the container's count, else counted from packets (no decode)."""
    _check_exists(src)
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


def decode_frames(src, indices: list[int]) -> list[Image.Image]:
    """The frames at ``indices`` (in that order, repeats allowed) as RGB images. A container that
    over-reports its frame count gives its last decodable frame for the indices past its end."""
    _check_exists(src)
    want, stop = set(indices), max(indices)
    frames: dict[int, Image.Image] = {}
    last = last_frame = None
    with _open(src) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    frames[i] = frame.to_image().convert("RGB")
                last, last_frame = i, frame
                if i >= stop:
                    break
        except Exception as e:
            raise SampleError("corrupt_media", f"cannot decode video: {e}") from None
        if last is None:
            raise SampleError("corrupt_media", "no frame of the video decodes")
        if last not in frames:
            frames[last] = last_frame.to_image().convert("RGB")
    return [frames[min(i, last)] for i in indices]


def read_frames(src, min_frames: int, max_frames: int, rng: random.Random | None) -> list[Image.Image]:
    """The sampled frames, in time order: training's draw (``rng`` given, frame count drawn in
    [min_frames, max_frames]) or the inference rule (``rng`` None, ``max_frames`` frames)."""
    if not 1 <= min_frames <= max_frames:
        raise UserError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    vlen = count_frames(src)
    if vlen < 1:
        raise SampleError("corrupt_media", "video has no frames")
    if rng is None:
        indices = inference_frame_indices(vlen, max_frames)
    else:
        indices = training_frame_indices(vlen, rng.randint(min_frames, max_frames), rng)
    return decode_frames(src, indices)
