"""What OpenVLA reads: its prompt, its pixels, and the per-benchmark observation transforms.

Prompt (experiments/robot/openvla_utils.py `get_vla_action`):
    "In: What action should the robot take to {instruction.lower()}?\nOut:"
tokenised with `<s>` first; `predict_action` appends token 29871 ("▁") when the prompt does not end
with it, to match training. `encode_instruction` returns those ids WITHOUT the leading `<s>`: the
model's prefix puts `<s>`, then the 256 patch embeddings, then these ids (upstream splices the
patches right after `<s>`).

Pixels (processing_prismatic.py, `resize-naive`): PIL resize of the RGB image to 224 x 224 with the
processor's interpolation (bicubic for both towers), to_tensor (/255), then each tower's own
mean/std (DINOv2: ImageNet; SigLIP: 0.5/0.5), the two results stacked into 6 channels. The values
are read from the folder's preprocessor_config.json (`tvf_resize_params`, `tvf_normalize_params`)
when it is there, so whatever the processor applies is applied here.

Benchmarks: `benchmark_image_transform` is the one place for what an evaluation protocol does to a
camera frame before the processor sees it (see LIBERO below).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPT = "In: What action should the robot take to {}?\nOut:"
EMPTY_TOKEN_ID = 29871  # "▁": upstream appends it after "Out:" (hard-coded id in predict_action)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOWER_NORMS = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD), "siglip": ((0.5,) * 3, (0.5,) * 3)}
PIL_BICUBIC = 3  # torchvision's pil_modes_mapping[BICUBIC], as stored in tvf_resize_params


def build_prompt(instruction: str) -> str:
    return PROMPT.format(instruction.lower())


def encode_instruction(tokenizer, instruction: str) -> list[int]:
    """The prompt's token ids after `<s>`, ending in 29871 (what the prefix reads after the patches)."""
    ids = list(tokenizer(build_prompt(instruction), add_special_tokens=True)["input_ids"])
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if not ids or ids[-1] != EMPTY_TOKEN_ID:
        ids.append(EMPTY_TOKEN_ID)
    return ids


@dataclass(frozen=True)
class PixelSpec:
    """How the processor turns one RGB image into the model's (3 * towers)-channel input."""

    size: int  # 224
    resample: int  # PIL resampling filter id (3 = bicubic)
    means: tuple[tuple[float, float, float], ...]  # one per tower
    stds: tuple[tuple[float, float, float], ...]

    @classmethod
    def for_towers(cls, kinds: list[str], size: int) -> PixelSpec:
        """The processor's values implied by the tower kinds (used when preprocessor_config.json is absent)."""
        return cls(size, PIL_BICUBIC, tuple(TOWER_NORMS[k][0] for k in kinds), tuple(TOWER_NORMS[k][1] for k in kinds))

    @classmethod
    def from_folder(cls, folder: str | Path, kinds: list[str], size: int) -> PixelSpec:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls.for_towers(kinds, size)
        cfg = json.loads(path.read_text())
        strategy = cfg.get("image_resize_strategy", "letterbox")  # the remote processor's default
        if strategy != "resize-naive" or cfg.get("tvf_do_letterbox"):
            raise ValueError(f"{path}: image_resize_strategy={strategy!r} is not supported (only resize-naive).")
        resize, norm = cfg.get("tvf_resize_params"), cfg.get("tvf_normalize_params")
        if not resize or not norm or len(resize) != len(kinds) or len(norm) != len(kinds):
            return cls.for_towers(kinds, size)
        sizes = {tuple(r["size"]) if isinstance(r["size"], list) else (r["size"],) * 2 for r in resize}
        filters = {int(r.get("interpolation", PIL_BICUBIC)) for r in resize}
        if sizes != {(size, size)} or len(filters) != 1:
            raise ValueError(f"{path}: resize params {resize} differ from one {size} x {size} resize.")
        return cls(size, filters.pop(), tuple(tuple(n["mean"]) for n in norm), tuple(tuple(n["std"]) for n in norm))


def resize_images(images, size: int, resample: int = PIL_BICUBIC):
    """images  # (B, H, W, 3) uint8 (tensor or array) -> (B, size, size, 3) uint8, same type/device.

    PIL's resize, as the processor's torchvision.functional.resize on a PIL image calls it, so the
    pixels match upstream exactly. Images already at `size` pass through untouched (no host copy):
    feed 224 x 224 frames to stay on the device.
    """
    if images.shape[1] == size and images.shape[2] == size:
        return images
    is_tensor = isinstance(images, torch.Tensor)
    arr = images.detach().cpu().numpy() if is_tensor else np.asarray(images)
    out = np.stack([np.asarray(Image.fromarray(a).resize((size, size), resample)) for a in arr])
    return torch.from_numpy(out).to(images.device) if is_tensor else out


def normalize_images(images: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """images  # (B, S, S, 3) uint8 -> pixel values (B, 3 * towers, S, S) float32, towers stacked."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    parts = []
    for mean, std in zip(spec.means, spec.stds):
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        parts.append((x - m) / s)
    return torch.cat(parts, 1)


def pixel_values(images, spec: PixelSpec) -> torch.Tensor:
    """The processor in one call: images  # (B, H, W, 3) uint8 -> (B, 3 * towers, S, S) float32."""
    images = torch.as_tensor(resize_images(images, spec.size, spec.resample))
    return normalize_images(images, spec)


# --- Benchmark observation transforms -------------------------------------------------------------

def jpeg_round_trip(image: np.ndarray, quality: int = 95) -> np.ndarray:
    """(H, W, 3) uint8 -> the same after a JPEG encode/decode, as the RLDS builder stored frames
    (tf.image.encode_jpeg's default quality is 95; PIL's libjpeg stands in for TensorFlow's)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def lanczos_resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL's Lanczos (a = 3, antialiased when shrinking),
    standing in for tf.image.resize(method="lanczos3", antialias=True) + round + clip."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def center_crop_resize(image: np.ndarray, crop_scale: float = 0.9, size: int = 224) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: the centre crop of `crop_scale` of the AREA (side
    sqrt(0.9)) resized back, reproducing upstream's TensorFlow path exactly in arithmetic:
    convert_image_dtype to [0, 1], tf.image.crop_and_resize (bilinear, box corners mapped to pixel
    centres 0 and H-1), clip, and convert_image_dtype back (floor(x * 255.5), TensorFlow's rule)."""
    h, w = image.shape[:2]
    side = min(max(math.sqrt(crop_scale), 0.0), 1.0)
    y1 = x1 = (1 - side) / 2
    img = image.astype(np.float32) * np.float32(1.0 / 255)  # convert_image_dtype's scale

    def grid(start: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = side * (n_in - 1) / (size - 1) if size > 1 else 0.0
        pos = np.float32(start * (n_in - 1)) + np.arange(size, dtype=np.float32) * np.float32(step)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(np.ceil(pos).astype(np.int64), n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, fy = grid(y1, h)
    xlo, xhi, fx = grid(x1, w)
    fx = fx[None, :, None]
    top = img[ylo][:, xlo] + (img[ylo][:, xhi] - img[ylo][:, xlo]) * fx
    bottom = img[yhi][:, xlo] + (img[yhi][:, xhi] - img[yhi][:, xlo]) * fx
    out = top + (bottom - top) * fy[:, None, None]
    out = np.clip(out, 0.0, 1.0)
    return np.floor(out * np.float32(255.5)).astype(np.uint8)


def benchmark_image_transform(benchmark: str, center_crop: bool, size: int = 224,
                              jpeg: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """The frame transform an evaluation protocol applies before OpenVLA's processor.

    frame  # (H, W, 3) uint8, already upright (vlarl's LIBERO env rotates it 180 degrees) -> (size, size, 3)

    libero*: experiments/robot/libero/libero_utils.py `get_libero_image` JPEG-encodes and decodes the
      frame, resizes it to 224 with tf lanczos3 (antialias) and rounds; here PIL's JPEG (quality 95)
      and Lanczos stand in (close, not bit-equal to TensorFlow). With `center_crop` (run_libero_eval's
      default, needed by models trained with crop augmentation) the centre 0.9 of the area is cropped
      and resized back to 224, reproduced exactly (`center_crop_resize`).
    toy / none: nothing; the processor's own resize applies.
    """
    name = benchmark.lower()
    if name.startswith("libero"):
        def transform(frame: np.ndarray) -> np.ndarray:
            frame = jpeg_round_trip(frame) if jpeg else frame
            frame = lanczos_resize(frame, size)
            return center_crop_resize(frame, 0.9, size) if center_crop else frame
        return transform
    if name in ("toy", "none", ""):
        return lambda frame: frame
    raise ValueError(f"no OpenVLA observation transform for benchmark {benchmark!r}; known: libero*, toy, none.")
