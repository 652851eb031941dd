"""Shared fixtures: the repository's files, the built `igpt` binary, and small models.

The Python package and the command line must agree, so the tests run both: the binary is
target/release/igpt (built by `cargo build --release` or `cargo test --release`), or where
CARGO_TARGET_DIR or IGPT_BIN points.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

# Both sides compute on the same number of threads (the binary's pool and this process's).
os.environ.setdefault("RAYON_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"


def igpt_binary():
    candidates = []
    if os.environ.get("IGPT_BIN"):
        candidates.append(Path(os.environ["IGPT_BIN"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "igpt")
    candidates.append(ROOT / "target" / "release" / "igpt")
    for c in candidates:
        if c.is_file():
            return c
    pytest.fail(
        "the igpt binary is missing (looked for "
        + ", ".join(str(c) for c in candidates)
        + "): build it first with `cargo build --release` in "
        + str(ROOT),
        pytrace=False,
    )


def run_cli(*args, check=True):
    """Runs `igpt ARGS` and returns the completed process."""
    p = subprocess.run(
        [str(igpt_binary()), *map(str, args)], capture_output=True, text=True
    )
    if check and p.returncode != 0:
        raise AssertionError(f"igpt {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p


_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U8": np.uint8,
           "U16": np.uint16, "I32": np.int32, "BF16": None}


def read_safetensors(path):
    """A safetensors file as {name: numpy array}: 8-byte header length, JSON header, bytes."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        lo, hi = t["data_offsets"]
        out[name] = np.frombuffer(body[lo:hi], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def metrics(run):
    """Training and validation losses of a run's metrics.jsonl, by step."""
    train, val = {}, {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "loss" in d:
            train[d["step"]] = d["loss"]
        if "val_loss" in d:
            val[d["step"]] = d["val_loss"]
    return train, val


# A tiny gray model trained on the shipped Fashion-MNIST split, resized to 8x8: the same
# settings as flags and as keyword arguments.
TRAIN_SETTINGS = dict(
    data="fashion-mnist", limit=120, side=8, palette_size=8, layers=2, embd=32, heads=2,
    steps=6, batch=4, micro_batch=2, lr=0.004, warmup=2, eval_every=3, eval_images=20,
    checkpoint_every=3, seed=5,
)


def as_flags(settings):
    flags = []
    for k, v in settings.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """A run trained by `igpt train` with TRAIN_SETTINGS."""
    out = tmp_path_factory.mktemp("cli") / "run"
    run_cli("train", *as_flags(TRAIN_SETTINGS), "--out", out)
    return out


@pytest.fixture(scope="session")
def model(cli_run):
    import igpt

    return igpt.Model.load(str(cli_run))


@pytest.fixture(scope="session")
def fashion_pngs(tmp_path_factory):
    """The first shipped Fashion-MNIST images as PNG files (for the commands that take files)."""
    import igpt
    from PIL import Image

    images, _ = igpt.load_data("fashion-mnist", limit=5)
    d = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, img in enumerate(images):
        p = d / f"f{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def photo_paths():
    return sorted((FIXTURES / "images").glob("*.png"))
