"""Writes small real-photo JPEGs (made by Pillow from the PNG fixtures of
tests/fixtures/images) and what Pillow and transformers make of them, for igpt's JPEG decoder
tests (tests/jpeg.rs).

tests/fixtures/jpeg/*.jpg                  the files: qualities 95/75/30, subsampling 4:4:4,
                                           4:2:2 and 4:2:0, progressive, restart markers,
                                           Huffman-optimised, grayscale and CMYK, odd sizes, and
                                           one arithmetic-coded (Pillow cannot write that: it is
                                           another one recoded, losslessly, by jpegtran)
tests/fixtures/jpeg/expected.safetensors
    {name}_rgb              uint8 [h, w, 3]   np.asarray(Image.open(f).convert("RGB"))
    {name}_ids_{fixture}    int64 [side*side] ImageGPTImageProcessorPil ids of
                                              Image.open(f).convert("RGB") for
                                              tests/fixtures/hf/{fixture}
    damaged_verdict         uint8 [N]         for N damaged copies of the files (below): 1 when
                                              Pillow decodes one, 0 when it refuses it, 2 when
                                              its header says over 2^22 pixels (not decoded)
    damaged_crc32           uint32 [N]        CRC-32 of Pillow's RGB of each one it decodes
    metadata: the Pillow, libjpeg-turbo, transformers, NumPy and jpegtran versions used

The damaged copies are made by the xorshift generator and `Rng::mutate` of tests/common/mod.rs
(reproduced below), DAMAGED_PER_FILE per file, the files in name order, and decoded by Pillow
with libjpeg-turbo's SIMD code switched off (JSIMD_FORCENONE=1, in a child process): libjpeg-turbo
guarantees its SIMD and plain C code the same output only on valid data, and on corrupt data
(coefficients past 16 bits) the two differ; igpt builds the plain C code.

Run after make_encode_fixtures.py: python scripts/make_jpeg_fixtures.py
(needs pillow, transformers, numpy, safetensors, and jpegtran: Debian's libjpeg-turbo-progs)
"""

import io
import json
import os
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import PIL
import transformers
from PIL import Image, features
from safetensors.numpy import save_file
from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
PNG = os.path.join(FIXTURES, "images")
OUT = os.path.join(FIXTURES, "jpeg")
HF = os.path.join(FIXTURES, "hf")

# A 67 x 45 crop of chelsea (odd sizes, partial MCUs at both edges) keeps the files small.
CROP = (30, 20, 97, 65)

# name: (source PNG, crop box or None, mode to save in, Pillow's save options)
FILES = {
    "chelsea-q95-444-131x97": ("chelsea-rgb-131x97", None, "RGB", dict(quality=95, subsampling=0)),
    "chelsea-q75-420-131x97": ("chelsea-rgb-131x97", None, "RGB", dict(quality=75, subsampling=2)),
    "chelsea-q30-422-67x45": ("chelsea-rgb-131x97", CROP, "RGB", dict(quality=30, subsampling=1)),
    "chelsea-q75-420-progressive-67x45": (
        "chelsea-rgb-131x97",
        CROP,
        "RGB",
        dict(quality=75, subsampling=2, progressive=True),
    ),
    "chelsea-q75-420-restarts-67x45": (
        "chelsea-rgb-131x97",
        CROP,
        "RGB",
        dict(quality=75, subsampling=2, restart_marker_blocks=3),
    ),
    "chelsea-q75-cmyk-67x45": ("chelsea-rgb-131x97", CROP, "CMYK", dict(quality=75)),
    "coffee-q75-420-200x9": ("coffee-rgb-200x9", None, "RGB", dict(quality=75, subsampling=2)),
    "coffee-q95-422-optimized-200x9": (
        "coffee-rgb-200x9",
        None,
        "RGB",
        dict(quality=95, subsampling=1, optimize=True),
    ),
    "chelsea-q75-420-20x13": ("chelsea-rgb-20x13", None, "RGB", dict(quality=75, subsampling=2)),
    "camera-gray-q75-75x60": ("camera-gray-75x60", None, "L", dict(quality=75)),
    "camera-gray-q30-progressive-75x60": ("camera-gray-75x60", None, "L", dict(quality=30, progressive=True)),
}
# name: the file it is recoded from with `jpegtran -arithmetic`
ARITHMETIC = {"chelsea-q30-422-arithmetic-67x45": "chelsea-q30-422-67x45"}


DAMAGED_PER_FILE = 60
DAMAGED_SEED = 0x2545F4914F6CDD1D
MASK = (1 << 64) - 1


class Rng:
    """tests/common/mod.rs's xorshift generator."""

    def __init__(self, state):
        self.state = state

    def next(self):
        s = self.state
        s ^= (s << 13) & MASK
        s ^= s >> 7
        s ^= (s << 17) & MASK
        self.state = s
        return s

    def mutate(self, good, start):
        """`good` with one to four bytes from `start` on replaced, one time in five cut short."""
        m = bytearray(good)
        for _ in range(1 + self.next() % 4):
            i = start + self.next() % (len(m) - start)
            m[i] = self.next() & 0xFF
        if self.next() % 5 == 0:
            m = m[: self.next() % len(m)]
        return bytes(m)


def damaged_files():
    """The damaged copies, in the order tests/jpeg.rs makes them (the SOI marker kept)."""
    rng = Rng(DAMAGED_SEED)
    for name in sorted([*FILES, *ARITHMETIC]):
        good = open(os.path.join(OUT, name + ".jpg"), "rb").read()
        for _ in range(DAMAGED_PER_FILE):
            yield rng.mutate(good, 3)


def decode_damaged(out_path):
    """Runs in a child process with JSIMD_FORCENONE=1."""
    assert os.environ.get("JSIMD_FORCENONE") == "1"
    verdicts, crcs = [], []
    for data in damaged_files():
        verdict, crc = 0, 0
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > 1 << 22:
                verdict = 2
            else:
                rgb = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
                verdict, crc = 1, zlib.crc32(rgb.tobytes())
        except Exception:
            pass
        verdicts.append(verdict)
        crcs.append(crc)
    np.savez(out_path, verdict=np.array(verdicts, np.uint8), crc=np.array(crcs, np.uint32))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--damaged":
        decode_damaged(sys.argv[2])
        return
    os.makedirs(OUT, exist_ok=True)
    processors = {}
    for name in sorted(os.listdir(HF)):
        cfg = json.load(open(os.path.join(HF, name, "preprocessor_config.json")))
        processors[name] = ImageGPTImageProcessorPil(clusters=cfg["clusters"], size=cfg["size"])
    expected = {}
    for old in os.listdir(OUT):
        if old.endswith(".jpg"):
            os.remove(os.path.join(OUT, old))
    for name, (src, box, mode, options) in FILES.items():
        path = os.path.join(OUT, name + ".jpg")
        img = Image.open(os.path.join(PNG, src + ".png"))
        if box is not None:
            img = img.crop(box)
        img.convert(mode).save(path, **options)
    for name, src in ARITHMETIC.items():
        path = os.path.join(OUT, name + ".jpg")
        subprocess.run(["jpegtran", "-arithmetic", "-outfile", path, os.path.join(OUT, src + ".jpg")], check=True)
    for name in sorted([*FILES, *ARITHMETIC]):
        path = os.path.join(OUT, name + ".jpg")
        img = Image.open(path)  # what igpt will read
        print(f"{name}: mode {img.mode}, {img.size}, {os.path.getsize(path)} bytes")
        rgb = img.convert("RGB")
        expected[f"{name}_rgb"] = np.asarray(rgb, dtype=np.uint8)
        for fx, proc in processors.items():
            ids = np.asarray(proc(rgb, return_tensors="np")["input_ids"][0], dtype=np.int64)
            expected[f"{name}_ids_{fx}"] = ids
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "damaged.npz")
        env = dict(os.environ, JSIMD_FORCENONE="1")
        subprocess.run([sys.executable, __file__, "--damaged", path], env=env, check=True)
        damaged = np.load(path)
        expected["damaged_verdict"] = damaged["verdict"]
        expected["damaged_crc32"] = damaged["crc"]
    v = expected["damaged_verdict"]
    print(f"damaged copies: {(v == 1).sum()} decoded, {(v == 0).sum()} refused, {(v == 2).sum()} too large")
    metadata = {
        "pillow": PIL.__version__,
        "libjpeg_turbo": str(features.version("libjpeg_turbo")),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "jpegtran": subprocess.run(["jpegtran", "-version"], capture_output=True, text=True).stderr.strip(),
        "damaged_per_file": str(DAMAGED_PER_FILE),
        "damaged_decoded_with": "JSIMD_FORCENONE=1",
    }
    print(metadata)
    save_file(expected, os.path.join(OUT, "expected.safetensors"), metadata=metadata)


if __name__ == "__main__":
    main()
