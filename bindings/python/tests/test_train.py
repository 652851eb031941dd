"""Training and fine-tuning from Python: the same settings as the command line's flags give
the same run, and the callback sees every step."""

from pathlib import Path

import pytest

import igpt
from conftest import TRAIN_SETTINGS, metrics, run_cli


def test_training_equals_igpt_train(cli_run, tmp_path):
    seen = []
    out = tmp_path / "run"
    s = igpt.train(out, callback=lambda *a: seen.append(a), **TRAIN_SETTINGS)
    want_train, want_val = metrics(cli_run)
    got_train, got_val = metrics(out)
    assert got_train == want_train and len(got_train) == TRAIN_SETTINGS["steps"]
    assert got_val == want_val and got_val
    # One call per step, in order, with that step's loss and a speed.
    assert [a[0] for a in seen] == list(range(1, TRAIN_SETTINGS["steps"] + 1))
    assert [a[1] for a in seen] == [want_train[k] for k in sorted(want_train)]
    assert all(a[2] > 0 for a in seen)
    assert s["steps"] == TRAIN_SETTINGS["steps"] and s["losses"] == [a[1] for a in seen]
    assert s["val_loss"] == want_val[max(want_val)]
    assert (out / "model.safetensors").read_bytes() == (cli_run / "model.safetensors").read_bytes()


def test_a_stopped_run_resumes_to_the_same_losses(cli_run, tmp_path):
    out = tmp_path / "run"
    first = igpt.train(out, stop_after=4, **TRAIN_SETTINGS)
    assert first["steps"] == 4
    rest = igpt.train(resume=out, callback=lambda *a: None)
    assert rest["steps"] == TRAIN_SETTINGS["steps"]
    assert metrics(out) == metrics(cli_run)


def test_a_failing_callback_stops_training_with_its_exception(tmp_path):
    def cb(step, loss, speed):
        if step == 2:
            raise RuntimeError("enough")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="enough"):
        igpt.train(out, callback=cb, **TRAIN_SETTINGS)
    # Stopped at step 2 with a checkpoint there: the run can be resumed.
    train, _ = metrics(out)
    assert max(train) == 2
    assert igpt.train(resume=out)["steps"] == TRAIN_SETTINGS["steps"]


def test_finetuning_equals_igpt_finetune(cli_run, tmp_path):
    settings = dict(limit=60, steps=4, batch=4, eval_every=2, probe_images=30, seed=1)
    flags = []
    for k, v in settings.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    run_cli("finetune", "--model", cli_run, "--data", "fashion-mnist", "--out",
            tmp_path / "cli", "--test-data", "fashion-mnist", "--test-limit", 30, *flags)
    seen = []
    s = igpt.finetune(cli_run, "fashion-mnist", tmp_path / "py", test_data="fashion-mnist",
                      test_limit=30, callback=lambda *a: seen.append(a), **settings)
    assert [a[0] for a in seen] == [1, 2, 3, 4]
    assert s["steps_run"] == 4 and 0 <= s["test_accuracy"] <= 1
    for f in ("model.safetensors", "head.safetensors"):
        assert (tmp_path / "py" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
    # The fine-tuned model loads, with its head beside it.
    assert igpt.Model.load(tmp_path / "py").layers == TRAIN_SETTINGS["layers"]


def test_the_callback_hears_the_loss_being_minimised(cli_run, tmp_path):
    settings = dict(limit=40, steps=1, batch=4, eval_every=1, probe_images=20, seed=3)
    first = {}
    for clf_only in (False, True):
        seen = []
        igpt.finetune(cli_run, "fashion-mnist", tmp_path / str(clf_only), clf_only=clf_only,
                      callback=lambda *a: seen.append(a), **settings)
        first[clf_only] = seen[0][1]
    # The same first batch through the same model: L_GEN + L_CLF, then L_CLF alone (L_GEN of a
    # pixel model is far above 0.1 nats).
    assert first[True] < first[False] - 0.1, first


def test_defaults_are_the_command_lines():
    d = igpt.train_defaults()
    assert d["data"] == "fashion-mnist" and d["steps"] == 1000 and d["batch"] == 8
    assert abs(d["lr"] - 3e-3) < 1e-9 and d["warmup"] == 100
    f = igpt.finetune_defaults()
    assert f["steps"] == 2000 and f["batch"] == 16 and f["patience"] == 5


def test_bad_settings_are_value_errors(tmp_path):
    for bad in (dict(stop_after=0), dict(side=0), dict(palette_size=0), dict(batch=0),
                dict(format="tiff"), dict(objective="gan"), dict(preset="huge")):
        with pytest.raises(ValueError):
            igpt.train(tmp_path / "x", **{**TRAIN_SETTINGS, **bad})
        assert not (tmp_path / "x").exists(), bad
    with pytest.raises(ValueError, match="not both"):
        igpt.train(tmp_path / "a", resume=tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        igpt.train(tmp_path / "y", **{**TRAIN_SETTINGS, "data": str(tmp_path / "none.npy")})
    assert not Path(tmp_path / "y").exists()
