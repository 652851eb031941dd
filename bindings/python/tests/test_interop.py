"""Logits, hidden states and token ids against what transformers computed (the committed
fixtures that tests/hf_models.rs and tests/encode.rs check the library with)."""

import numpy as np
import pytest
from PIL import Image

import igpt
from conftest import FIXTURES, photo_paths, read_safetensors, run_cli

HF = ["small-a", "small-b"]


def assert_close(got, want, tol=1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.abs(want).max()), 1.0)
    worst = float(np.abs(got - want).max())
    assert worst <= tol * scale, f"max abs difference {worst} (scale {scale})"


@pytest.mark.parametrize("name", HF)
def test_logits_and_hidden_states_match_transformers(name):
    m = igpt.Model.load(FIXTURES / "hf" / name)
    exp = read_safetensors(FIXTURES / "hf" / name / "expected.safetensors")
    raw = exp["raw_ids"]
    logits = m.logits(raw, raw=True, batch=2)
    assert logits.dtype == np.float32
    assert logits.shape == (*raw.shape, m.colours)
    assert_close(logits, exp["raw_logits"].reshape(logits.shape))
    for layer in (0, 1, m.layers):
        h = m.hidden_states(raw, layer, raw=True, batch=3)
        assert h.shape == (*raw.shape, m.width)
        assert_close(h, exp[f"raw_hidden_{layer}"].reshape(h.shape))
    pixels = exp["pixels"]
    got = m.logits(pixels)
    assert_close(got, exp["sos_logits"].reshape(got.shape))
    # Any integer type, and one sequence as [1, T].
    assert_close(m.logits(pixels.astype(np.int32)), got, 0)
    # (A batch of one goes through other kernels: equal to rounding.)
    assert_close(m.logits(pixels[0])[0], got[0], 1e-5)


@pytest.mark.parametrize("name", HF)
def test_encode_ids_equal_the_hugging_face_processor(name):
    m = igpt.Model.load(FIXTURES / "hf" / name)
    exp = read_safetensors(FIXTURES / "images" / "expected.safetensors")
    paths = photo_paths()
    assert len(paths) == 6
    modes = set()
    for p in paths:
        img = Image.open(p)
        modes.add(img.mode)
        want = exp[f"{p.stem}_ids_{name}"].reshape(1, -1)
        got = m.encode(img)
        assert got.dtype == np.int64 and got.shape == (1, m.side * m.side)
        assert np.array_equal(got, want), p.name
        # The same image as a numpy array (alpha, if any, dropped by igpt).
        if img.mode in ("L", "RGB", "RGBA"):
            assert np.array_equal(m.encode([np.asarray(img)]), want), p.name
    # Gray, RGB, RGBA and palette images were all exercised.
    assert {"L", "RGB", "RGBA", "P"} <= modes, modes


def test_encode_equals_the_command_line(tmp_path):
    model = FIXTURES / "hf" / "small-a"
    paths = photo_paths()
    out = tmp_path / "ids.npy"
    run_cli("encode", "--model", model, *paths, "--out", out)
    want = np.load(out)
    m = igpt.Model.load(model)
    assert np.array_equal(m.encode([Image.open(p) for p in paths]), want)


def test_a_stacked_array_and_a_list_give_the_same_ids():
    m = igpt.Model.load(FIXTURES / "hf" / "small-b")
    images, _ = igpt.load_data("fashion-mnist", limit=4)
    assert images.dtype == np.uint8 and images.shape == (4, 28, 28)
    stacked = m.encode(images)
    assert np.array_equal(stacked, m.encode(list(images)))
    # RGB copies of gray images and RGBA with any alpha: the same ids.
    rgb = np.repeat(images[..., None], 3, axis=3)
    assert np.array_equal(m.encode(rgb), stacked)
    rgba = np.concatenate([rgb, np.full((4, 28, 28, 1), 7, np.uint8)], axis=3)
    assert np.array_equal(m.encode(rgba), stacked)
    # Decoding gives back the palette's colours of those ids.
    decoded = m.decode(stacked)
    assert decoded.shape == (4, m.side, m.side, m.channels) and decoded.dtype == np.uint8
    assert np.array_equal(m.encode(decoded), stacked)


def test_model_properties():
    m = igpt.Model.load(FIXTURES / "hf" / "small-a")
    assert (m.side, m.channels, m.colours) == (8, 3, 16)
    assert m.layers == 2 and m.width % m.heads == 0
    assert m.objective == "autoregressive"
    p = m.palette
    assert p.dtype == np.float32 and p.shape == (m.colours, m.channels)
    assert float(np.abs(p).max()) <= 1.0
    assert "small-a" in repr(m)


def test_outputs_are_handed_over_without_a_copy():
    m = igpt.Model.load(FIXTURES / "hf" / "small-a")
    ids = m.encode(np.zeros((2, 8, 8, 3), np.uint8))
    f = m.features(ids, layers=[1])
    for a in (ids, f, m.logits(ids)):
        # The array's memory is the Rust vector's, owned by a container object.
        assert not a.flags.owndata and a.base is not None and a.flags.c_contiguous
