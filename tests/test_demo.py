"""`python -m fastconv demo`: end to end on CPU with a tiny setting, the two runs' agreement,
the files it writes, and its argument checks."""

import argparse
import copy
import importlib.util
import io
import json

import pytest
import torch

import fastconv
from fastconv import demo
from fastconv.models import MODELS
from fastconv.utils import layer_shapes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("curves", "filters", "feature_maps", "confusion")


def _args(*argv):
    parser = argparse.ArgumentParser(prog="fastconv demo")
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(capsys, *argv):
    rc = demo.run(_args(*argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, "--models", "simplecnn", "--epochs", "1", "--limit", "96",
                        "--batch-size", "32", "--device", "cpu", "--out", str(out_dir))
    assert rc == 0, err
    # the side-by-side table: header, one row for the one epoch, the summary lines
    assert "torch.nn" in out and "fastconv" in out and "|dloss|" in out
    assert any(line.lstrip().startswith("1/1") for line in out.splitlines())
    assert "final test accuracy" in out and "=> the same up to float32 rounding" in out
    assert "\r" not in out  # stdout is not a terminal: no redrawn progress bar in the log

    for kind in PLOTS:
        path = out_dir / f"simplecnn_{kind}.png"
        assert path.stat().st_size > 10_000, kind
        assert path.read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out_dir / "summary.json").read_text())
    s = summary["settings"]
    assert (s["models"], s["epochs"], s["limit"], s["seed"], s["device"], s["dtype"]) == (
        ["simplecnn"], 1, 96, 0, "cpu", "float32")
    assert s["train_images"] == 96 and s["test_images"] == 96
    assert summary["environment"]["torch"] == torch.__version__
    (m,) = summary["models"]
    assert m["model"] == "simplecnn"
    # fastconv really ran: every conv and pool of SimpleCNN was swapped
    assert m["converted_layers"] == {"Conv2d": 3, "MaxPool2d": 3}
    assert len(m["epochs"]) == 1 and set(m["epochs"][0]) >= {"torch", "fastconv", "epoch"}
    for run in ("torch", "fastconv"):
        e = m["epochs"][0][run]
        assert 0 < e["train_loss"] < 3 and 0 <= e["test_acc"] <= 1 and e["time_s"] > 0
        assert m["time_s"][run] == pytest.approx(e["time_s"])
        assert m["final_test_acc"][run] == e["test_acc"]
    a, b = m["step_losses"]["torch"], m["step_losses"]["fastconv"]
    assert len(a) == len(b) == 3  # 96 images / batch 32
    # the reported maximum is the real one, and within the stated float32 tolerances: the two
    # runs over their (only) epoch, and the same-weights checks before and after it
    assert m["max_abs_loss_diff"] == max(abs(x - y) for x, y in zip(a, b))
    assert m["first_epoch_max_abs_loss_diff"] == m["max_abs_loss_diff"]
    assert m["max_abs_loss_diff"] <= demo.FIRST_EPOCH_TOLERANCE[torch.float32] == 1e-4
    tol_loss, tol_grad = demo.LOCKSTEP_TOLERANCE[torch.float32]
    assert m["tolerance"] == {"lockstep_loss": tol_loss, "lockstep_rel_grad": tol_grad,
                              "first_epoch_loss": 1e-4}
    assert [c["after_epoch"] for c in m["lockstep"]] == [0, 1]
    for c in m["lockstep"]:
        assert c["abs_loss_diff"] == abs(c["loss_torch"] - c["loss_fastconv"]) <= tol_loss
        assert c["rel_grad_diff"] <= tol_grad
    assert m["epochs"][0]["lockstep"] == m["lockstep"][1]
    assert m["within_tolerance"] and summary["within_tolerance"]
    assert summary["max_abs_loss_diff"] == m["max_abs_loss_diff"]
    assert len(m["confusion_matrix"]) == 10 and sum(map(sum, m["confusion_matrix"])) == 96
    assert len(m["feature_map_stages"]) == 3
    assert all(m["files"][k].endswith(f"simplecnn_{k}.png") for k in PLOTS)


def test_demo_float64_runs_agree_to_rounding(tmp_path, capsys):
    """In float64 the two runs' losses agree to ~1e-12 after two epochs: the only difference
    is the summation order inside the kernels."""
    rc, out, err = _run(capsys, "--models", "simplecnn", "--epochs", "2", "--limit", "64",
                        "--batch-size", "16", "--dtype", "float64", "--no-plots",
                        "--out", str(tmp_path))
    assert rc == 0, err
    m = json.loads((tmp_path / "summary.json").read_text())["models"][0]
    assert len(m["step_losses"]["torch"]) == 8
    assert m["max_abs_loss_diff"] <= demo.FIRST_EPOCH_TOLERANCE[torch.float64] == 1e-10
    assert m["lockstep_max_abs_loss_diff"] <= 1e-10 and m["lockstep_max_rel_grad_diff"] <= 1e-8
    assert m["max_abs_weight_diff"] < 1e-9 and m["within_tolerance"]
    assert not list(tmp_path.glob("*.png"))


def test_demo_harness_is_bit_identical_without_fastconv(tmp_path, capsys, monkeypatch):
    """With convert() replaced by a plain deepcopy the two runs must match bit for bit, so
    whatever difference the real demo reports comes from the kernels, not from the harness
    (batch order, dropout masks, interleaving the two runs)."""
    monkeypatch.setattr(fastconv, "convert", copy.deepcopy)
    rc, out, err = _run(capsys, "--models", "vgg", "--epochs", "2", "--limit", "48",
                        "--batch-size", "16", "--no-plots", "--out", str(tmp_path))
    assert rc == 0, err
    m = json.loads((tmp_path / "summary.json").read_text())["models"][0]
    assert "Dropout" in repr(MODELS["vgg"](1, 10))  # the RNG-state handling is exercised
    assert m["converted_layers"] == {}
    assert m["max_abs_loss_diff"] == 0.0 and m["max_abs_weight_diff"] == 0.0
    assert all(c["abs_loss_diff"] == 0.0 and c["rel_grad_diff"] == 0.0 for c in m["lockstep"])


def test_demo_reports_a_real_difference(tmp_path, capsys, monkeypatch):
    """A fastconv run that computes something else (same weights, outputs scaled by 1.5) is
    flagged: exit code 1, a warning, OUTSIDE in the table, within_tolerance false."""
    def wrong(model):
        model = copy.deepcopy(model)
        model.register_forward_hook(lambda m, inputs, output: output * 1.5)
        return model

    monkeypatch.setattr(fastconv, "convert", wrong)
    rc, out, err = _run(capsys, "--models", "simplecnn", "--epochs", "1", "--limit", "32",
                        "--no-plots", "--out", str(tmp_path))
    assert rc == 1 and "differ by more than floating-point rounding" in err
    assert "=> OUTSIDE float32 rounding" in out
    assert not json.loads((tmp_path / "summary.json").read_text())["within_tolerance"]


def test_convert_changing_weights_is_an_error(tmp_path, monkeypatch):
    def perturbed(model):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return model

    monkeypatch.setattr(fastconv, "convert", perturbed)
    with pytest.raises(RuntimeError, match="fastconv.convert changed features.0.weight"):
        demo.run(_args("--models", "simplecnn", "--epochs", "1", "--limit", "16",
                       "--no-plots", "--out", str(tmp_path)))


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "expected a positive integer, but got 0"),
    (["--epochs", "two"], "expected a positive integer, but got 'two'"),
    (["--batch-size", "-4"], "expected a positive integer, but got -4"),
    (["--limit", "0"], "expected a positive integer, but got 0"),
    (["--lr", "0"], "expected a positive number, but got 0"),
    (["--lr", "nan"], "expected a positive number, but got nan"),
    (["--seed", "-1"], "expected a non-negative integer, but got -1"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_bad_arguments_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _args(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("models,message", [
    ("simplecnn,lenet", "unknown model 'lenet' in --models; choose from simplecnn, vgg"),
    ("", "--models is empty"),
    (" , ", "--models is empty"),
])
def test_bad_model_names(models, message, tmp_path, capsys):
    rc, out, err = _run(capsys, "--models", models, "--out", str(tmp_path))
    assert rc == 2
    assert err.startswith("fastconv demo: error: ") and message in err
    assert not (tmp_path / "summary.json").exists()


def test_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, out, err = _run(capsys, "--models", "simplecnn", "--out", str(f))
    assert rc == 2 and "exists and is not a directory" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_requested_without_a_gpu(tmp_path, capsys):
    rc, out, err = _run(capsys, "--device", "cuda", "--out", str(tmp_path))
    assert rc == 2 and "--device cuda: no CUDA device is available" in err


def test_model_selection_and_device_resolution():
    names, device, dtype = demo._resolve(_args("--models", "all"))
    assert names == list(MODELS)
    assert dtype == torch.float32
    expected = "cuda" if (torch.cuda.is_available() and fastconv._C.with_cuda) else "cpu"
    assert device.type == expected
    names, _, dtype = demo._resolve(_args("--models", " VGG, simplecnn,vgg ", "--device", "cpu",
                                          "--dtype", "float64"))
    assert names == ["vgg", "simplecnn"] and dtype == torch.float64
    assert demo._resolve(_args())[0] == demo.DEFAULT_MODELS.split(",")


@pytest.mark.skipif(importlib.util.find_spec("fastconv.benchmark") is None,
                    reason="fastconv.cli imports every command; the bench command is not here")
def test_cli_dispatches_to_demo(capsys):
    from fastconv import cli

    assert cli.main(["demo", "--models", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def test_data_split_is_fixed_and_standardised():
    x_tr, y_tr, x_te, y_te, raw = demo.load_digits_split()
    assert x_tr.shape == (1437, 1, 32, 32) and x_te.shape == (360, 1, 32, 32)
    assert raw.shape == (360, 1, 8, 8) and 0 <= raw.min() and raw.max() <= 1
    counts = torch.bincount(y_te)  # stratified: every digit ~10% of the test set
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37
    assert abs(x_tr.mean().item()) < 0.05 and abs(x_tr.std().item() - 1) < 1e-6
    again = demo.load_digits_split()
    assert torch.equal(again[1], y_tr) and torch.equal(again[2], x_te)
    small = demo.load_digits_split(limit=50)
    assert len(small[1]) == 50 and len(small[3]) == 50
    assert torch.equal(small[1], y_tr[:50])


def test_progress_bar_only_draws_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain = io.StringIO()
    p = demo.Progress(plain)
    p.start("epoch 1/1 torch.nn", 3)
    for _ in range(3):
        p.step()
    p.clear()
    assert plain.getvalue() == ""
    tty = Tty()
    p = demo.Progress(tty, width=10)
    p.start("epoch 1/2 fastconv", 4)
    p.step()
    p.step()
    assert tty.getvalue().endswith("[#####.....] 2/4")
    p.clear()
    assert tty.getvalue().endswith("\r")


@pytest.mark.parametrize("name", list(MODELS))
def test_feature_map_stages_follow_the_resolutions(name):
    torch.manual_seed(0)
    model = MODELS[name](1, 10)
    image = torch.randn(1, 1, 32, 32)
    stages = demo.stage_outputs(model, image)
    assert len(stages) >= 3
    sizes = [t.shape[-1] for _, t in stages]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    real = {r.name: r.input_shape for r in layer_shapes(model, (1, 1, 32, 32),
                                                        leaves_only=False)}
    for label, t in stages:
        block = label.split(" as it enters ")[1].split(" ")[0]
        assert (1,) + tuple(t.shape) == real[block], label
    # the same image through the fastconv model gives the same maps
    converted = fastconv.convert(model)
    for (la, a), (lb, b) in zip(stages, demo.stage_outputs(converted, image)):
        assert la.split(" (")[0] == lb.split(" (")[0]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
