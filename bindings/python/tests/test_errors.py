"""Errors become natural Python exceptions; Ctrl-C stops long calls; the GIL is released."""

import os
import signal
import threading
import time

import numpy as np
import pytest

import igpt
from conftest import FIXTURES


@pytest.fixture(scope="module")
def hf():
    return igpt.Model.load(FIXTURES / "hf" / "small-a")


def test_missing_paths_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        igpt.Model.load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        igpt.load_data(str(tmp_path / "none.npy"))


def test_bad_input_is_a_value_error_with_igpts_message(hf, tmp_path):
    with pytest.raises(ValueError, match="pixel ids must be in 0..16"):
        hf.logits(np.array([[3, 99]]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        hf.logits(np.zeros((1, 65), np.int64))
    with pytest.raises(ValueError, match="hidden state 9"):
        hf.hidden_states(np.zeros((1, 4), np.int64), 9)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        hf.features(np.zeros((1, 64), np.int64), layers=[7])
    with pytest.raises(ValueError, match="uint8"):
        hf.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        hf.encode(np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="temperature"):
        hf.sample(1, temperature=-1.0)
    with pytest.raises(ValueError, match="top-p"):
        hf.sample(1, top_p=0.0)
    with pytest.raises(ValueError, match="longer than the image"):
        hf.complete(np.zeros((8, 8, 3), np.uint8), rows=9)
    with pytest.raises(ValueError, match="token ids must be"):
        hf.decode(np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="unknown device"):
        igpt.Model.load(FIXTURES / "hf" / "small-a", device="tpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        igpt.Model.load(tmp_path)
    # The model still works after every one of those.
    assert hf.logits(np.zeros((1, 4), np.int64)).shape == (1, 4, 16)


@pytest.fixture
def sigint():
    """Python's own Ctrl-C handler, whatever this process inherited: a shell starts background
    jobs with SIGINT ignored, and Python then leaves it ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupt_after(seconds):
    t = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_ctrl_c_stops_a_long_call_and_the_model_stays_usable(hf, sigint):
    many = np.zeros((20000, 64), np.int64)
    t0 = time.monotonic()
    t = _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        hf.features(many, layers=[1], batch=8)
    t.join()
    assert time.monotonic() - t0 < 10
    t = _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        hf.sample(5000, batch=4)
    t.join()
    assert hf.features(many[:2], layers=[1]).shape == (2, hf.width)


def test_ctrl_c_stops_training_at_a_step(tmp_path, sigint):
    def cb(step, loss, speed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)

    with pytest.raises(KeyboardInterrupt):
        igpt.train(tmp_path / "run", data="fashion-mnist", limit=50, side=6, palette_size=4,
                   layers=1, embd=16, heads=2, steps=50, batch=2, callback=cb)
    assert (tmp_path / "run" / "trainer.safetensors").exists()


def test_the_gil_is_released_while_rust_computes(hf):
    many = np.zeros((3000, 64), np.int64)
    ticks = 0
    done = threading.Event()

    def work():
        hf.features(many, layers=[1])
        done.set()

    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    th.join()
    assert ticks > 5
