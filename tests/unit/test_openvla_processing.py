"""OpenVLA's pixel preprocessing and the LIBERO frame transform on constructed images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlarl.models.openvla.processing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelSpec,
    benchmark_image_transform,
    center_crop_resize,
    pixel_values,
    resize_images,
)

SIDE = math.sqrt(0.9)  # crop side fraction for 0.9 of the area
OFFSET = (1 - SIDE) / 2


def test_center_crop_of_a_gradient_is_the_hand_computed_ramp():
    # img[y, x] = x. TF's crop_and_resize samples x_in(j) = OFFSET * 223 + j * SIDE * 223 / 223; linear
    # interpolation of a ramp is the ramp, so out(j) = floor(x_in(j) / 255 * 255.5) (convert_image_dtype).
    img = np.tile(np.arange(224, dtype=np.uint8)[None, :, None], (224, 1, 3))
    out = center_crop_resize(img, 0.9, 224)
    x_in = OFFSET * 223 + np.arange(224) * SIDE
    expected = np.floor(x_in / 255 * 255.5).astype(int)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out[100, :, 0].astype(int) - expected).max() <= 1  # float32 vs float64 at floor edges
    assert (out[100, :, 0].astype(int) == expected).mean() > 0.95
    assert (out == out[:1]).all()  # every row the same


def test_center_crop_enlarges_a_centred_square_by_the_hand_computed_factor():
    img = np.zeros((224, 224, 3), np.uint8)
    img[62:162, 62:162] = 255  # a 100 px white square centred at 111.5
    out = center_crop_resize(img, 0.9, 224)
    # output j samples x_in(j) = 5.7218 + 0.94868 j: fully white while 62 <= x_in <= 161, i.e. j in 60..163
    row = out[112, :, 0]
    assert (row[60:164] == 255).all() and (row[:59] == 0).all() and (row[165:] == 0).all()
    assert 0 < row[59] < 255 and 0 < row[164] < 255  # the interpolated edges
    assert (out[:, 112, 0] == row).all()  # symmetric


def test_libero_transform_shapes_and_constant_images():
    frame = np.full((256, 256, 3), 90, np.uint8)
    for crop in (False, True):
        out = benchmark_image_transform("libero_spatial", center_crop=crop)(frame)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - 90).max() <= 1  # JPEG + Lanczos keep a flat image flat
    assert benchmark_image_transform("toy", center_crop=True)(frame) is frame
    with pytest.raises(ValueError, match="benchmark 'bridge'"):
        benchmark_image_transform("bridge", center_crop=False)


def test_pixel_values_resize_like_pil_and_normalise_per_tower():
    spec = PixelSpec.for_towers(["dinov2", "siglip"], 224)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 256, 200, 3), dtype=np.uint8)
    resized = resize_images(imgs, 224)
    expected = np.asarray(Image.fromarray(imgs[1]).resize((224, 224), Image.BICUBIC))
    np.testing.assert_array_equal(resized[1], expected)
    same = torch.as_tensor(resized)
    assert resize_images(same, 224) is same  # already the model's size: untouched
    px = pixel_values(same, spec)
    assert px.shape == (2, 6, 224, 224) and px.dtype == torch.float32
    x = same[0, 5, 7].float() / 255
    dino = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    np.testing.assert_allclose(px[0, :3, 5, 7], dino, atol=1e-6)
    np.testing.assert_allclose(px[0, 3:, 5, 7], (x - 0.5) / 0.5, atol=1e-6)


def test_family_frame_transform_is_the_benchmark_transform_on_libero_only():
    from vlarl.config import load_config
    from vlarl.models.openvla.family import OpenVLA

    cfg = load_config(["model=openvla", "model.center_crop=true"]).model
    frames = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    images = OpenVLA().frame_transform("libero_spatial", cfg)({"image": frames, "instruction": ["a", "b"]})
    expected = np.stack([benchmark_image_transform("libero_spatial", True)(f) for f in frames])
    assert images.shape == (2, 224, 224, 3) and np.array_equal(images, expected)
    assert OpenVLA().frame_transform("toy", cfg) is None
