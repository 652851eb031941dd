"""Features, sampling, completion and scores: equal to the command line's."""

import numpy as np
from PIL import Image

import igpt
from conftest import FIXTURES, photo_paths, read_safetensors, run_cli


def test_features_equal_igpt_features(cli_run, model, tmp_path):
    out = tmp_path / "f.safetensors"
    run_cli("features", "--model", cli_run, "--data", "fashion-mnist", "--limit", 40,
            "--layers", "0,1,2", "--out", out)
    want = read_safetensors(out)
    images, labels = igpt.load_data("fashion-mnist", limit=40)
    got = model.features(images, layers=[0, 1, 2])
    assert got.dtype == np.float32 and got.shape == (40, 3 * model.width)
    assert np.array_equal(got, want["features"])
    assert np.array_equal(labels, want["labels"])
    # From the ids, from one layer, and from all layers (the default).
    ids = model.encode(images)
    assert np.array_equal(model.features(ids, layers=[0, 1, 2]), got)
    assert np.array_equal(model.features(images, layers=[1]), want["layer_1"])
    assert np.array_equal(model.features(images), got)


def test_sampling_is_reproducible_and_equals_igpt_sample(cli_run, model, tmp_path):
    images, ids = model.sample(5, seed=3, batch=2, return_tokens=True)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert ids.shape == (5, 64) and ids.dtype == np.int64
    again = model.sample(5, seed=3, batch=4)
    assert np.array_equal(again, images)
    assert not np.array_equal(model.sample(5, seed=4), images)
    assert np.array_equal(model.decode(ids), images)
    tokens = tmp_path / "t.npy"
    run_cli("sample", "--model", cli_run, "--n", 5, "--seed", 3, "--out",
            tmp_path / "s.png", "--tokens", tokens)
    assert np.array_equal(np.load(tokens).reshape(5, 64).astype(np.int64), ids)
    # Top-k and temperature are passed on: greedy sampling is one image whatever the seed.
    greedy = model.sample(2, temperature=0.0, seed=1)
    assert np.array_equal(greedy[0], greedy[1])


def test_completion_equals_igpt_complete(cli_run, model, fashion_pngs, tmp_path):
    tokens = tmp_path / "c.npy"
    run_cli("complete", "--model", cli_run, "--images", *fashion_pngs, "--k", 3,
            "--rows", 3, "--seed", 2, "--out", tmp_path / "c.png", "--tokens", tokens)
    imgs = [Image.open(p) for p in fashion_pngs]
    out, ids = model.complete(imgs, rows=3, k=3, seed=2, return_tokens=True)
    n = len(imgs)
    assert out.shape == (n, 3, 8, 8, 1) and ids.shape == (n, 3, 64)
    want = np.load(tokens).reshape(n, 3, 64).astype(np.int64)
    assert np.array_equal(ids, want)
    # The kept rows are the originals'.
    originals = model.encode(imgs)
    assert np.array_equal(ids[:, :, :24], np.repeat(originals[:, None, :24], 3, axis=1))


def test_rgb_completion_of_photos_equals_igpt_complete(tmp_path):
    # Gray, RGB, RGBA and palette files: PIL's reading and the Rust decoder's agree.
    model = FIXTURES / "hf" / "small-a"
    paths = photo_paths()
    tokens = tmp_path / "c.npy"
    run_cli("complete", "--model", model, "--images", *paths, "--k", 2,
            "--prefix-pixels", 20, "--seed", 9, "--out", tmp_path / "c.png",
            "--tokens", tokens)
    m = igpt.Model.load(model)
    out, ids = m.complete([Image.open(p) for p in paths], prefix_pixels=20, k=2, seed=9,
                          batch=5, return_tokens=True)
    assert out.shape == (len(paths), 2, 8, 8, 3)
    assert np.array_equal(ids.reshape(-1, 64), np.load(tokens).reshape(-1, 64))


def test_scores_equal_igpt_score(cli_run, model, fashion_pngs, tmp_path):
    csv = tmp_path / "s.csv"
    run_cli("score", "--model", cli_run, "--images", *fashion_pngs, "--csv", csv)
    want = np.array([float(line.split(",")[2])
                     for line in csv.read_text().splitlines()[1:]])
    got = model.score([Image.open(p) for p in fashion_pngs])
    assert got.dtype == np.float64 and got.shape == (len(fashion_pngs),)
    assert np.abs(got - want).max() <= 1e-6
    assert np.array_equal(model.score(model.encode([Image.open(p) for p in fashion_pngs])),
                          got)
