"""Writes small real photos (from scikit-image's data) in several sizes and modes, and what
Pillow and transformers make of them, for igpt's encoder tests.

tests/fixtures/images/*.png          the images (RGB, grayscale, palette, RGBA; up- and downscaled)
tests/fixtures/images/expected.safetensors
    {name}_resized_{S}      uint8 [S, S, 3]  Pillow: img.convert("RGB").resize((S, S), BILINEAR)
    {name}_ids_{fixture}    int64 [side*side] ImageGPTImageProcessorPil ids for tests/fixtures/hf/{fixture}
It also checks, for every one of the 2^24 RGB colours, that the quantiser rule igpt uses
(float32 |a|^2, float64 dot products without fused multiply-add) picks the same cluster as the
processor's NumPy code for both fixture palettes.

Run after make_hf_fixtures.py: python scripts/make_encode_fixtures.py
(needs scikit-image, pillow, transformers, numpy, safetensors)
"""

import json
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from skimage import data
from transformers.models.imagegpt.image_processing_pil_imagegpt import (
    ImageGPTImageProcessorPil,
    color_quantize,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "images")
HF = os.path.join(HERE, "..", "tests", "fixtures", "hf")
SIZES = [32, 8]


def images():
    chelsea = Image.fromarray(data.chelsea())  # 300 x 451 RGB
    coffee = Image.fromarray(data.coffee())  # 400 x 600 RGB
    astronaut = Image.fromarray(data.astronaut())  # 512 x 512 RGB
    camera = Image.fromarray(data.camera())  # 512 x 512 grayscale
    rgba = astronaut.crop((150, 40, 250, 120)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "chelsea-rgb-131x97": chelsea.crop((120, 40, 251, 137)),
        "camera-gray-75x60": camera.crop((200, 80, 275, 140)),
        "coffee-palette-120x90": coffee.resize((120, 90), Image.BILINEAR).quantize(colors=48),
        "astronaut-rgba-100x80": rgba,
        "chelsea-rgb-20x13": chelsea.crop((200, 60, 220, 73)),  # smaller than the target: upscaling
        "coffee-rgb-200x9": coffee.crop((100, 200, 300, 209)),  # one axis down, the other up
    }


def check_quantiser(clusters):
    """igpt's rule against NumPy's for every RGB colour."""
    levels = np.arange(256, dtype=np.uint8)
    norm = ((levels.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    c = np.asarray(clusters, dtype=np.float64)
    b2 = (c[:, 0] * c[:, 0] + c[:, 1] * c[:, 1]) + c[:, 2] * c[:, 2]
    mismatches = 0
    for r in range(256):
        g, b = np.meshgrid(levels, levels, indexing="ij")
        x = np.stack([np.full(g.shape, norm[r], np.float32), norm[g], norm[b]], -1).reshape(-1, 3)
        theirs = color_quantize(x, c)
        a2 = ((x[:, 0] * x[:, 0] + x[:, 1] * x[:, 1]) + x[:, 2] * x[:, 2]).astype(np.float64)
        x64 = x.astype(np.float64)
        ab = (x64[:, None, 0] * c[None, :, 0] + x64[:, None, 1] * c[None, :, 1]) + x64[:, None, 2] * c[None, :, 2]
        ours = np.argmin((a2[:, None] - 2 * ab) + b2[None, :], axis=1)
        mismatches += int((ours != theirs).sum())
    return mismatches


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    fixtures = {}
    for name in sorted(os.listdir(HF)):
        cfg = json.load(open(os.path.join(HF, name, "preprocessor_config.json")))
        fixtures[name] = ImageGPTImageProcessorPil(clusters=cfg["clusters"], size=cfg["size"])
        print(f"{name}: quantiser mismatches over all 2^24 colours: {check_quantiser(cfg['clusters'])}")
    for name, img in images().items():
        path = os.path.join(OUT, name + ".png")
        img.save(path, optimize=True)
        img = Image.open(path)  # what igpt will read
        print(f"{name}: mode {img.mode}, {img.size}, {os.path.getsize(path)} bytes")
        rgb = img.convert("RGB")
        for s in SIZES:
            expected[f"{name}_resized_{s}"] = np.asarray(rgb.resize((s, s), Image.BILINEAR), dtype=np.uint8)
        for fx, proc in fixtures.items():
            ids = np.asarray(proc(rgb, return_tensors="np")["input_ids"][0], dtype=np.int64)
            expected[f"{name}_ids_{fx}"] = ids
    save_file(expected, os.path.join(OUT, "expected.safetensors"))


if __name__ == "__main__":
    main()
