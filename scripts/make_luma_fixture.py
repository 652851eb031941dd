"""Writes tests/fixtures/luma/: a 64x64 RGB image of 4,096 varied colours (rgb.png) and Pillow's
own `convert("L")` of it (l.png), which tests/tokens.rs compares with igpt's RGB-to-gray.

    pip install pillow && python3 scripts/make_luma_fixture.py
"""

from pathlib import Path

from PIL import Image

out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "luma"
out.mkdir(parents=True, exist_ok=True)
pixels = []
for i in range(64 * 64):
    # The eight corners of the colour cube first, then colours spread over it.
    if i < 8:
        pixels.append(tuple(255 * ((i >> k) & 1) for k in range(3)))
    else:
        v = (i * 2654435761) & 0xFFFFFF
        pixels.append((v >> 16, (v >> 8) & 255, v & 255))
rgb = Image.new("RGB", (64, 64))
rgb.putdata(pixels)
rgb.save(out / "rgb.png")
rgb.convert("L").save(out / "l.png")
print("wrote", out)
