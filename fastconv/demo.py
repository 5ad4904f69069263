"""`python -m fastconv demo`: train the tutorials' CNNs twice, with torch.nn layers and with
fastconv's, on scikit-learn's bundled handwritten digits, and show that only the speed changes.

For every chosen model: build it once from --seed, deep-copy it, convert one copy with
fastconv.convert (Conv2d / MaxPool2d -> fastconv's), and train both copies with the same
optimizer settings, the same batches in the same order and the same dropout masks. The two
runs are interleaved epoch by epoch so that the table shows them side by side as it goes.
Both runs only differ in the convolution and pooling kernels, which sum in a different
order: the losses agree to rounding at first, and SGD then amplifies that rounding, so in
float32 the runs drift apart slowly (the curves still overlap). A lockstep check therefore
makes the verdict: after every epoch the torch.nn run's weights go through both kinds of
layers on the same batch, and loss and gradients must agree to rounding (see
LOCKSTEP_TOLERANCE). The table and summary.json give both differences.

Data: sklearn.datasets.load_digits (1797 8x8 images shipped with scikit-learn, nothing is
downloaded), a fixed stratified 80/20 split (1437 / 360, independent of --seed), scaled to
[0, 1], upsampled (bilinear) to 32x32, the input size fastconv.models.MODELS are sized for,
and standardised with the training mean and std.

Written to --out: <model>_curves.png (loss / accuracy of both runs and the per-step loss
difference), <model>_filters.png (first-layer filters), <model>_feature_maps.png (one test
image through each conv stage), <model>_confusion.png, and summary.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 32          # what fastconv.models.MODELS are built for (SimpleCNN's Linear)
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0           # the split is fixed, whatever --seed says
DEFAULT_MODELS = "simplecnn,mobilenet"
DEFAULT_EPOCHS = 8

# What "the same up to floating-point rounding" means here, per dtype.
#
# The verdict is a same-weights check: at the start and after every epoch the torch.nn run's
# current weights are loaded into three scratch copies -- torch.nn layers, fastconv layers,
# and torch.nn layers in float64 (the ground truth) -- and each does one forward and backward
# on the same batch (BatchNorm in training mode as in training, dropout off so that no random
# mask differs). fastconv's loss and gradients must match the float64 ones to rounding:
# |loss error| and, over parameters, max |gradient error| / max(max |float64 gradient of that
# parameter|, 1e-2 * max |any float64 gradient|) -- the floor keeps parameters whose gradient
# is ~0 (a bias right before BatchNorm) from dividing by noise. How large float32 rounding
# makes these errors depends on the state: ~1e-6 for SimpleCNN, but ~1e-3 for VGG at its
# initial weights, where BatchNorm's backward subtracts nearly equal numbers -- for torch.nn's
# own float32 gradients just as for fastconv's. So fastconv passes when its errors are within
# LOCKSTEP_TOLERANCE or within TORCH_ERROR_FACTOR times torch.nn's errors on the same check;
# a wrong gradient or pooling index gives 1e-2 or more where torch.nn's error is ~1e-6.
# The torch.nn-vs-fastconv difference is reported too.
LOCKSTEP_TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-10, 1e-8)}
TORCH_ERROR_FACTOR = 10
#
# The two independent runs (torch.nn from start to end, fastconv from start to end) start
# equally close, but SGD amplifies any difference, rounding included: in float32 SimpleCNN's
# per-step losses stay within ~1e-6 for its first epoch and drift to ~1e-2 later; MobileNet
# (BatchNorm, SiLU, squeeze-and-excitation, lr 0.05) drifts to ~1e-3 within five steps. Two
# torch runs that summed in a different order would drift the same way, so this difference is
# reported (table, curves, JSON), not judged.


class DemoError(ValueError):
    """A bad option: reported as `fastconv demo: error: ...` with exit code 2."""


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, but got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, but got {text}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, but got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, but got {value}")
    return value


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Trains every chosen model twice (torch.nn layers, then the same weights after\n"
        "fastconv.convert) on scikit-learn's digits and writes curves, filters, feature maps,\n"
        "confusion matrices and summary.json to --out.")
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help="comma-separated names from fastconv.models.MODELS, or 'all' "
                             f"(default: {DEFAULT_MODELS})")
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                        help=f"training epochs (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when available and fastconv has CUDA kernels, else CPU")
    parser.add_argument("--out", default="demo_out",
                        help="directory for the plots and summary.json (default: demo_out)")
    parser.add_argument("--batch-size", type=_positive_int, default=64,
                        help="training batch size (default: 64)")
    parser.add_argument("--lr", type=_positive_float, default=0.05,
                        help="peak SGD learning rate (momentum 0.9, cosine decay to 0 over the "
                             "run; default: 0.05)")
    parser.add_argument("--seed", type=_non_negative_int, default=0,
                        help="seed for the initial weights, batch order and dropout (default: 0)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="use only the first N training and first N test images "
                             "(quick checks)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="parameter and data dtype (default: float32)")
    parser.add_argument("--control", action="store_true",
                        help="also train a third, torch.nn run from the same weights moved by one "
                             "rounding step (1 ulp): shows how far SGD alone carries a "
                             "rounding-sized difference (about 50%% more time)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG files (summary.json is still written)")


def _resolve(args):
    """Check the options that argparse cannot: model names and the device."""
    import fastconv
    from fastconv.models import MODELS

    text = (args.models or "").strip()
    if not text:
        raise DemoError(f"--models is empty; choose from {', '.join(MODELS)} or 'all'")
    if text.lower() == "all":
        names = list(MODELS)
    else:
        names = []
        for part in text.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in MODELS:
                raise DemoError(
                    f"unknown model {part.strip()!r} in --models; choose from "
                    f"{', '.join(MODELS)} or 'all'")
            if name not in names:
                names.append(name)
        if not names:
            raise DemoError(f"--models is empty; choose from {', '.join(MODELS)} or 'all'")
    cuda_ok = torch.cuda.is_available() and bool(getattr(fastconv._C, "with_cuda", 0))
    if args.device == "auto":
        device = torch.device("cuda" if cuda_ok else "cpu")
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise DemoError("--device cuda: no CUDA device is available (torch.cuda.is_available()"
                            " is False); use --device cpu or auto")
        if not cuda_ok:
            raise DemoError("--device cuda: this fastconv build has no CUDA kernels; rebuild "
                            "with CUDA or use --device cpu")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DemoError(f"--out {args.out!r} exists and is not a directory")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    return names, device, dtype


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def load_digits_split(limit=None, size=INPUT_SIZE):
    """(x_train, y_train, x_test, y_test, images_test_8x8) as CPU tensors.

    Fixed stratified split; bilinear upsampling from 8x8 to `size` x `size` (the images stay
    smooth digits, just sampled more finely), then standardised with the training statistics.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    if limit is not None:
        idx_train, idx_test = idx_train[:limit], idx_test[:limit]
    raw_test = x[idx_test]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test], raw_test


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One of the two trainings: its model, optimizer, batch-order generator and its own
    global-RNG state (dropout draws from the global generator; each run gets the same
    stream, no matter how the two runs are interleaved)."""

    def __init__(self, label, model, args, device, total_steps=None):
        self.label = label
        self.model = model
        self.device = device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        # cosine decay to 0 over the whole training, per step: the BatchNorm models end on
        # settled weights, so their eval-mode accuracy does not jump around in the last epochs
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps)
                          if total_steps else None)
        self.order = torch.Generator().manual_seed(args.seed)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed + 1)
            self.rng = self._get_rng()
        self.step_losses = []
        self.time_s = 0.0

    def _get_rng(self):
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state):
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def train_epoch(self, x, y, batch_size, progress):
        saved = self._get_rng()
        self._set_rng(self.rng)
        self.model.train()
        perm = torch.randperm(len(y), generator=self.order).to(x.device)
        nb = math.ceil(len(y) / batch_size)
        losses, correct = [], torch.zeros((), dtype=torch.int64, device=x.device)
        _sync(self.device)
        t0 = time.perf_counter()
        for b in range(nb):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            out = self.model(xb)
            loss = F.cross_entropy(out, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            losses.append(loss.detach() * len(idx))
            correct += (out.argmax(1) == yb).sum()
            progress.step()
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.time_s += elapsed
        self.rng = self._get_rng()
        self._set_rng(saved)
        sizes = [min(batch_size, len(y) - b * batch_size) for b in range(nb)]
        per_batch = [v / n for v, n in zip(torch.stack(losses).tolist(), sizes)]
        self.step_losses.extend(per_batch)
        return sum(v * n for v, n in zip(per_batch, sizes)) / len(y), correct.item() / len(y), \
            elapsed

    @torch.no_grad()
    def evaluate(self, x, y, batch_size=512):
        self.model.eval()
        total, preds = 0.0, []
        for b in range(0, len(y), batch_size):
            out = self.model(x[b:b + batch_size])
            total += F.cross_entropy(out, y[b:b + batch_size], reduction="sum").item()
            preds.append(out.argmax(1))
        preds = torch.cat(preds)
        return total / len(y), (preds == y).float().mean().item(), preds.cpu()


class Progress:
    """A plain-text progress bar on one line. On a terminal it redraws in place with '\\r';
    when stdout is not a terminal (CI logs, pipes) it draws nothing, and the per-epoch table
    rows are the progress."""

    def __init__(self, stream=None, width=28):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.total = 1
        self.done = 0
        self.label = ""
        self._last = 0

    def start(self, label, total):
        self.label, self.total, self.done = label, max(1, total), 0
        self._draw()

    def step(self):
        self.done += 1
        self._draw()

    def _draw(self):
        if not self.tty:
            return
        filled = int(self.width * self.done / self.total)
        text = (f"  {self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{self.done}/{self.total}")
        self.stream.write("\r" + text.ljust(self._last))
        self.stream.flush()
        self._last = len(text)

    def clear(self):
        if self.tty and self._last:
            self.stream.write("\r" + " " * self._last + "\r")
            self.stream.flush()
            self._last = 0


def _count_converted(model):
    counts = {}
    for m in model.modules():
        if type(m).__module__.startswith("fastconv.nn"):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def _fmt_pct(v):
    return f"{100 * v:5.1f}%"


def _check_passes(c, tol_loss, tol_grad):
    """fastconv's errors against float64 are rounding-sized: within the tolerance, or within
    TORCH_ERROR_FACTOR times torch.nn's own errors on the same weights and batch."""
    return (c["fastconv_loss_err"] <= max(tol_loss, TORCH_ERROR_FACTOR * c["torch_loss_err"])
            and c["fastconv_rel_grad_err"] <= max(tol_grad,
                                                  TORCH_ERROR_FACTOR * c["torch_rel_grad_err"]))


def _one_ulp_away(model, seed):
    """A copy of `model` with every parameter moved to the next representable number up or
    down (random direction): the size of difference that a different summation order makes."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.randint(0, 2, p.shape, generator=g).bool().to(p.device)
            target = torch.where(up, float("inf"), float("-inf")).to(p.dtype)
            p.copy_(torch.nextafter(p, target))
    return model


class Lockstep:
    """The same-weights check (see LOCKSTEP_TOLERANCE): the torch.nn run's current weights,
    one batch, through torch.nn layers, fastconv layers and torch.nn layers in float64.
    Scratch copies, so neither training run is touched."""

    def __init__(self, reference, converted, x, y):
        self.models = (copy.deepcopy(reference), copy.deepcopy(converted),
                       copy.deepcopy(reference).double())
        for m in self.models:
            m.train()
            for d in m.modules():  # random masks would differ between the dtypes
                if isinstance(d, nn.modules.dropout._DropoutNd):
                    d.eval()
        self.x, self.y = x, y

    @staticmethod
    def _errors(loss, grads, loss_ref, grads_ref):
        pairs = [(a, b) for a, b in zip(grads, grads_ref) if a is not None and b is not None]
        top = max((b.abs().max().item() for _, b in pairs), default=0.0)
        floor = 1e-2 * top if top > 0 else 1.0
        rel = max(((a.double() - b).abs().max().item() / max(b.abs().max().item(), floor)
                   for a, b in pairs), default=0.0)
        return abs(loss - loss_ref), rel

    def __call__(self, weights):
        state = weights.state_dict()
        losses, grads = [], []
        for m in self.models:
            m.load_state_dict(state)  # copies (and casts) into the scratch parameters
            m.zero_grad(set_to_none=True)
            x = self.x.double() if m is self.models[2] else self.x
            loss = F.cross_entropy(m(x), self.y)
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad for p in m.parameters()])
        t_loss, t_grad = self._errors(losses[0], grads[0], losses[2], grads[2])
        f_loss, f_grad = self._errors(losses[1], grads[1], losses[2], grads[2])
        d_loss, d_grad = self._errors(losses[1], grads[1], losses[0],
                                      [g.double() if g is not None else None for g in grads[0]])
        return {"loss_torch": losses[0], "loss_fastconv": losses[1], "loss_float64": losses[2],
                "torch_loss_err": t_loss, "torch_rel_grad_err": t_grad,
                "fastconv_loss_err": f_loss, "fastconv_rel_grad_err": f_grad,
                "abs_loss_diff": d_loss, "rel_grad_diff": d_grad}


def train_pair(name, data, args, device, dtype, out_stream=None):
    """Train model `name` with torch.nn layers and with fastconv's; return the summary dict and
    the two trained models."""
    import fastconv
    from fastconv.models import MODELS

    out = out_stream or sys.stdout
    x_train, y_train, x_test, y_test = (t.to(device) for t in data[:4])
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    torch.manual_seed(args.seed)
    base = MODELS[name](1, NUM_CLASSES).to(device=device, dtype=dtype)
    reference = copy.deepcopy(base)
    converted = fastconv.convert(base)
    counts = _count_converted(converted)
    for (k, a), b in zip(reference.state_dict().items(), converted.state_dict().values()):
        if not torch.equal(a, b):  # convert must keep every weight bit for bit
            raise RuntimeError(f"{name}: fastconv.convert changed {k}")
    nb = math.ceil(len(y_train) / args.batch_size)
    runs = [Run("torch.nn", reference, args, device, nb * args.epochs),
            Run("fastconv", converted, args, device, nb * args.epochs)]
    if getattr(args, "control", False):
        runs.append(Run("control", _one_ulp_away(reference, args.seed), args, device,
                        nb * args.epochs))
    n_params = sum(p.numel() for p in reference.parameters())
    lockstep = Lockstep(reference, converted, x_train[:args.batch_size],
                        y_train[:args.batch_size])
    checks = [dict(lockstep(reference), after_epoch=0)]
    tol_loss, tol_grad = LOCKSTEP_TOLERANCE[dtype]
    dname = str(dtype).replace("torch.", "")

    conv_desc = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing"
    print(f"\n== {name}: {n_params:,} parameters; fastconv.convert swapped {conv_desc}", file=out)
    print(f"   {len(y_train)} train / {len(y_test)} test digits at 1x{INPUT_SIZE}x{INPUT_SIZE}, "
          f"{device.type}, {str(dtype).replace('torch.', '')}, SGD lr {args.lr:g} (cosine) "
          "momentum 0.9, "
          f"batch {args.batch_size}, seed {args.seed}", file=out)
    head1 = (f"{'':7} | {'torch.nn':^21} | {'fastconv':^21} | {'two runs':^10} | "
             f"{'grad error vs fp64':^17} | {'time (s)':^17}")
    header = (f"{'epoch':>7} | {'loss':>7} {'train':>6} {'test':>6} | {'loss':>7} {'train':>6} "
              f"{'test':>6} | {'max|dloss|':>10} | {'torch.nn':>8} {'fastconv':>8} | "
              f"{'torch.nn':>8} {'fastconv':>8}")
    print("   two runs max|dloss|: largest per-step loss difference between the two trainings "
          "this epoch.\n   grad error vs fp64: the torch.nn run's weights after the epoch, one "
          "batch through torch.nn and\n   fastconv layers; largest relative gradient error "
          "against the same model in float64.", file=out)
    print(head1, file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    out.flush()
    progress = Progress(out)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        row = {"epoch": epoch}
        for run in runs:
            progress.start(f"epoch {epoch}/{args.epochs} {run.label:<8}", nb)
            tr_loss, tr_acc, elapsed = run.train_epoch(x_train, y_train, args.batch_size,
                                                       progress)
            te_loss, te_acc, preds = run.evaluate(x_test, y_test)
            key = ("torch", "fastconv", "control")[runs.index(run)]
            row[key] = {"train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss,
                        "test_acc": te_acc, "time_s": elapsed}
            run.preds = preds
        progress.clear()
        steps = slice((epoch - 1) * nb, epoch * nb)
        step_diff = max(abs(a - b) for a, b in zip(runs[0].step_losses[steps],
                                                    runs[1].step_losses[steps]))
        row["max_abs_step_loss_diff"] = step_diff
        if len(runs) > 2:
            row["control_max_abs_step_loss_diff"] = max(
                abs(u - v) for u, v in zip(runs[0].step_losses[steps], runs[2].step_losses[steps]))
        checks.append(dict(lockstep(reference), after_epoch=epoch))
        row["lockstep"] = checks[-1]
        epochs.append(row)
        t, f = row["torch"], row["fastconv"]
        c = checks[-1]
        print(f"{epoch:>3}/{args.epochs:<3} | {t['train_loss']:7.4f} {_fmt_pct(t['train_acc'])} "
              f"{_fmt_pct(t['test_acc'])} | {f['train_loss']:7.4f} {_fmt_pct(f['train_acc'])} "
              f"{_fmt_pct(f['test_acc'])} | {step_diff:10.2e} | {c['torch_rel_grad_err']:8.1e} "
              f"{c['fastconv_rel_grad_err']:8.1e} | {t['time_s']:8.2f} {f['time_s']:8.2f}",
              file=out)
        out.flush()

    a, b = runs[0].step_losses, runs[1].step_losses
    max_diff = max(abs(u - v) for u, v in zip(a, b))
    first = epochs[0]["max_abs_step_loss_diff"]
    param_diff = max((p - q).abs().max().item() for p, q in
                     zip(reference.parameters(), converted.parameters()))
    ls_loss = max(c["fastconv_loss_err"] for c in checks)
    ls_grad = max(c["fastconv_rel_grad_err"] for c in checks)
    within = all(_check_passes(c, tol_loss, tol_grad) for c in checks)
    agree = (runs[0].preds == runs[1].preds).float().mean().item()
    ratio = runs[1].time_s / runs[0].time_s if runs[0].time_s > 0 else float("nan")
    final_t, final_f = epochs[-1]["torch"]["test_acc"], epochs[-1]["fastconv"]["test_acc"]
    print(f"   final test accuracy: torch.nn {_fmt_pct(final_t).strip()}, fastconv "
          f"{_fmt_pct(final_f).strip()}; predictions agree on {_fmt_pct(agree).strip()} of the "
          f"test set", file=out)
    print(f"   same weights vs float64 ({len(checks)} checks): fastconv loss error "
          f"{ls_loss:.1e}, gradient error {ls_grad:.1e}; torch.nn "
          f"{max(c['torch_loss_err'] for c in checks):.1e} / "
          f"{max(c['torch_rel_grad_err'] for c in checks):.1e} (tolerance: {tol_loss:g} / "
          f"{tol_grad:g}, or {TORCH_ERROR_FACTOR}x torch.nn's)", file=out)
    print(f"   the two runs: max |loss difference| {first:.1e} in epoch 1, {max_diff:.1e} over "
          f"all {len(a)} steps; final max |weight difference| {param_diff:.1e}", file=out)
    if len(runs) > 2:
        ctl = [abs(u - v) for u, v in zip(a, runs[2].step_losses)]
        print(f"   control, torch.nn vs torch.nn from weights 1 ulp apart: max |loss difference| "
              f"{max(ctl[:nb]):.1e} in epoch 1, {max(ctl):.1e} over all {len(ctl)} steps",
              file=out)
    print("   " + ("=> the same up to " if within else "=> OUTSIDE ") + f"{dname} rounding"
          + ("" if within else " (see summary.json)")
          + ("; the drift between the two runs is rounding amplified by SGD"
             if within and max_diff > tol_loss else ""), file=out)
    print(f"   training time: torch.nn {runs[0].time_s:.2f}s, fastconv {runs[1].time_s:.2f}s "
          f"(fastconv / torch.nn = {ratio:.2f}x)", file=out)
    summary = {
        "model": name,
        "parameters": n_params,
        "converted_layers": counts,
        "epochs": epochs,
        "step_losses": {"torch": a, "fastconv": b,
                        **({"control": runs[2].step_losses} if len(runs) > 2 else {})},
        "max_abs_loss_diff": max_diff,
        "first_epoch_max_abs_loss_diff": first,
        "max_abs_epoch_loss_diff": max(abs(r["torch"]["train_loss"] - r["fastconv"]["train_loss"])
                                       for r in epochs),
        "lockstep": checks,
        "lockstep_fastconv_max_loss_err": ls_loss,
        "lockstep_fastconv_max_rel_grad_err": ls_grad,
        "lockstep_torch_max_loss_err": max(c["torch_loss_err"] for c in checks),
        "lockstep_torch_max_rel_grad_err": max(c["torch_rel_grad_err"] for c in checks),
        "lockstep_max_abs_loss_diff": max(c["abs_loss_diff"] for c in checks),
        "lockstep_max_rel_grad_diff": max(c["rel_grad_diff"] for c in checks),
        "tolerance": {"lockstep_loss": tol_loss, "lockstep_rel_grad": tol_grad,
                      "or_times_torch_error": TORCH_ERROR_FACTOR},
        "within_tolerance": within,
        "max_abs_weight_diff": param_diff,
        "prediction_agreement": agree,
        "final_test_acc": {"torch": final_t, "fastconv": final_f},
        "time_s": {"torch": runs[0].time_s, "fastconv": runs[1].time_s,
                   "fastconv_over_torch": ratio},
    }
    return summary, runs


# --------------------------------------------------------------------------------------------
# plots (matplotlib, Agg; imported only here)
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summary, path):
    plt = _pyplot()
    ep = [r["epoch"] for r in summary["epochs"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"torch": dict(color="tab:blue", lw=2.5, alpha=0.55, label_name="torch.nn"),
              "fastconv": dict(color="tab:red", lw=1.2, ls="--", marker="o", ms=3,
                               label_name="fastconv")}
    for key, st in styles.items():
        st = dict(st)
        lname = st.pop("label_name")
        axes[0].plot(ep, [r[key]["train_loss"] for r in summary["epochs"]],
                     label=f"{lname} train", **st)
        axes[0].plot(ep, [r[key]["test_loss"] for r in summary["epochs"]],
                     label=f"{lname} test", **{**st, "color": "tab:green" if key == "torch"
                                                else "tab:purple"})
        axes[1].plot(ep, [100 * r[key]["train_acc"] for r in summary["epochs"]],
                     label=f"{lname} train", **st)
        axes[1].plot(ep, [100 * r[key]["test_acc"] for r in summary["epochs"]],
                     label=f"{lname} test", **{**st, "color": "tab:green" if key == "torch"
                                                else "tab:purple"})
    axes[0].set(title="cross-entropy loss", xlabel="epoch", ylabel="loss")
    losses = [r[k][m] for r in summary["epochs"] for k in styles
              for m in ("train_loss", "test_loss")]
    if min(losses) > 0 and max(losses) / min(losses) > 20:  # log only where it helps
        axes[0].set_yscale("log")
    axes[1].set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_xticks(ep if len(ep) <= 12 else ep[::max(1, len(ep) // 10)])
    a, b = summary["step_losses"]["torch"], summary["step_losses"]["fastconv"]
    diff = [abs(u - v) for u, v in zip(a, b)]
    steps_per_epoch = len(a) / max(1, len(ep))
    x = [(i + 1) / steps_per_epoch for i in range(len(diff))]
    # exact agreement (0) is drawn at the bottom of the log axis, a decade below the smallest
    # non-zero value shown
    shown = diff + [c[k] for c in summary["lockstep"]
                    for k in ("torch_rel_grad_err", "fastconv_rel_grad_err")]
    if "control" in summary["step_losses"]:
        shown += [abs(u - v) for u, v in zip(a, summary["step_losses"]["control"])]
    floor = min([v for v in shown if v > 0] or [1e-8]) / 10
    axes[2].semilogy(x, [max(d, floor) for d in diff], color="black", lw=1,
                     label="|loss difference| of the two runs, per step")
    if "control" in summary["step_losses"]:
        ctl = [abs(u - v) for u, v in zip(a, summary["step_losses"]["control"])]
        axes[2].semilogy(x, [max(d, floor) for d in ctl], color="gray", lw=1, alpha=0.8,
                         label="control: torch.nn vs torch.nn from weights 1 ulp apart")
    ls = summary["lockstep"]
    at = [c["after_epoch"] for c in ls]
    axes[2].semilogy(at, [max(c["torch_rel_grad_err"], floor) for c in ls], "s",
                     color="tab:blue", ms=6, alpha=0.7,
                     label="same weights: torch.nn gradient error vs float64")
    axes[2].semilogy(at, [max(c["fastconv_rel_grad_err"], floor) for c in ls], "o",
                     color="tab:red", ms=4, label="same weights: fastconv gradient error")
    axes[2].axhline(summary["tolerance"]["lockstep_rel_grad"], color="tab:red", ls=":",
                    label=f"gradient error tolerance {summary['tolerance']['lockstep_rel_grad']:g}"
                    f" (or {summary['tolerance']['or_times_torch_error']}x torch.nn's)")
    axes[2].set(title="differences between torch.nn and fastconv", xlabel="epoch",
                ylabel="difference / relative error")
    axes[2].grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=7)
    axes[2].set_ylim(bottom=floor / 2)
    if any(v == 0 for v in shown):
        axes[2].text(0.01, 0.98, f"exactly equal: drawn at {floor:.0e}", fontsize=7,
                     color="gray", va="top", transform=axes[2].transAxes)
    fig.suptitle(f"{summary['model']}: torch.nn vs fastconv layers, same initial weights and "
                 f"batches (max |loss difference| between the runs "
                 f"{summary['max_abs_loss_diff']:.1e})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _first_conv(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError("the model has no Conv2d layer")


def plot_filters(model, other, path, title):
    plt = _pyplot()
    name, conv = _first_conv(model)
    w = conv.weight.detach().float().cpu()[:, 0]  # (out, kh, kw); channel 0 of the input
    w_other = _first_conv(other)[1].weight.detach().float().cpu()[:, 0]
    n = w.shape[0]
    cols = min(8, n)
    rows = math.ceil(n / cols)
    lim = w.abs().max().item() or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 1.2, 1.5 * rows + 0.9),
                             squeeze=False)
    im = None
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        im = ax.imshow(w[i].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_title(f"filter {i}", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="weight")
    diff = (w - w_other).abs().max().item()
    fig.suptitle(f"{title}\n{name}: {n} learned {w.shape[1]}x{w.shape[2]} filters "
                 f"(max |difference| to the torch.nn run: {diff:.1e})", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _enclosing_block(name, modules):
    """The outermost ancestor-or-self of module `name` that is an element of an nn.Sequential
    or nn.ModuleList: the block (SimpleCNN's pool, ResNet's BasicBlock, MobileNet's MBConv)
    whose input is a finished stage, never a tensor from the middle of a block."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        parent = modules[".".join(parts[:i - 1])]
        if isinstance(parent, (nn.Sequential, nn.ModuleList)):
            return ".".join(parts[:i])
    return name


def stage_outputs(model, image, input_size=INPUT_SIZE):
    """Feature maps of `image` (1, C, H, W) at the end of each conv stage of the main path.

    A stage is the stretch of the main path (fastconv.utils.receptive_field: shortcuts and
    squeeze-and-excitation branches left out) between two changes of resolution. Its output is
    the input of the block that starts the next resolution (see _enclosing_block), so residual
    additions and activations are included; resolution changes not preceded by a conv (a
    stride-2 stem on the raw image, a pool right after a pool) start no stage.
    Returns [(label, tensor (C, h, w))]."""
    from .utils import receptive_field

    modules = dict(model.named_modules())
    size = (input_size, input_size)
    targets, prev_conv = [], False
    for r in receptive_field(model, input_size):
        reduces = r.output_size[0] < size[0] or r.output_size[1] < size[1]
        if reduces and prev_conv:
            block = _enclosing_block(r.name, modules)
            if block not in targets:
                targets.append(block)
        prev_conv = isinstance(modules[r.name], nn.Conv2d)
        size = r.output_size
    captured = {}
    hooks = [modules[t].register_forward_pre_hook(
        lambda mod, inputs, name=t: captured.setdefault(name, inputs[0].detach().clone()))
        for t in targets]
    try:
        model.eval()
        with torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
    result = []
    for i, t in enumerate(targets, 1):
        fmap = captured[t][0]
        result.append((f"stage {i}: {fmap.shape[0]} x {fmap.shape[1]} x {fmap.shape[2]}, as it "
                       f"enters {t} ({type(modules[t]).__name__})", fmap.float().cpu()))
    return result


def plot_feature_maps(model, image, raw_image, label, pred, path, title, max_channels=8):
    plt = _pyplot()
    stages = stage_outputs(model, image)
    rows, cols = len(stages) + 1, max_channels
    # one extra narrow column holds each row's colour bar, so no bar covers a map
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.5 * cols + 0.6, 1.75 * rows + 0.7),
                             squeeze=False,
                             gridspec_kw={"width_ratios": [1] * cols + [0.07], "hspace": 0.65})
    for ax in axes[:, :cols].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[0, 2:].flat:
        ax.axis("off")
    # row 0: the 8x8 digit as shipped and the upsampled, standardised network input
    axes[0, 0].imshow(raw_image[0].float().numpy(), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
    axes[0, 0].set_title("digit (8x8)", fontsize=8)
    im = axes[0, 1].imshow(image[0, 0].float().cpu().numpy(), cmap="gray")
    axes[0, 1].set_title(f"input ({image.shape[-2]}x{image.shape[-1]})", fontsize=8)
    cax = axes[0, 2].inset_axes([0.0, 0.0, 0.07, 1.0])
    fig.colorbar(im, cax=cax, label="input value")
    axes[0, 3].text(0.0, 0.5, f"true label {label}, predicted {pred}", fontsize=10,
                    va="center", transform=axes[0, 3].transAxes)
    for r, (text, fmap) in enumerate(stages, 1):
        # the most active channels, so the row is not full of dead ReLU maps
        order = fmap.abs().flatten(1).mean(1).argsort(descending=True)[:cols].sort().values
        vmin, vmax = fmap[order].min().item(), fmap[order].max().item()
        for c, ch in enumerate(order.tolist()):
            im = axes[r, c].imshow(fmap[ch].numpy(), cmap="viridis", vmin=vmin, vmax=vmax,
                                   interpolation="nearest")
            axes[r, c].set_title(f"channel {ch}", fontsize=7)
        for c in range(len(order), cols):
            axes[r, c].axis("off")
        fig.colorbar(im, cax=axes[r, cols], label="activation")
        axes[r, 0].set_ylabel(f"stage {r}", fontsize=9)
        axes[r, 0].annotate(text, xy=(0, 1.28), xycoords="axes fraction", fontsize=8.5,
                            ha="left", va="bottom", fontweight="bold")
    axes[0, cols].axis("off")
    fig.suptitle(f"{title}\nfeature maps after each conv stage (the {cols} most active channels; "
                 "one colour scale per row)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [s[0] for s in stages]


def plot_confusion(y_true, y_pred, path, title):
    plt = _pyplot()
    k = NUM_CLASSES
    cm = torch.zeros(k, k, dtype=torch.int64)
    cm.index_put_((y_true.cpu(), y_pred.cpu()), torch.ones(len(y_true), dtype=torch.int64),
                  accumulate=True)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(cm.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, label="test images")
    peak = cm.max().item()
    for i in range(k):
        for j in range(k):
            v = cm[i, j].item()
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9,
                        color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set(xlabel="predicted digit", ylabel="true digit")
    acc = cm.diag().sum().item() / max(1, cm.sum().item())
    ax.set_title(f"{title}\ntest accuracy {100 * acc:.1f}% ({cm.sum().item()} images)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return cm.tolist()


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def _environment(device):
    import fastconv

    env = {
        "torch": torch.__version__,
        "fastconv": fastconv.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        env["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    return env


def run(args) -> int:
    try:
        names, device, dtype = _resolve(args)
    except DemoError as e:
        print(f"fastconv demo: error: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        # full-precision cuDNN / cuBLAS: TF32 would make torch.nn differ from fastconv by ~1e-3
        # for a reason that has nothing to do with the kernels being compared
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    data = load_digits_split(args.limit)
    print(f"fastconv demo: {', '.join(names)} on scikit-learn digits "
          f"({len(data[1])} train / {len(data[3])} test), {args.epochs} epoch(s), {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    results = []
    for name in names:
        summary, runs = train_pair(name, data, args, device, dtype)
        files = {}
        if not args.no_plots:
            ref, fc = runs[0].model, runs[1].model
            files["curves"] = os.path.join(args.out, f"{name}_curves.png")
            plot_curves(summary, files["curves"])
            files["filters"] = os.path.join(args.out, f"{name}_filters.png")
            plot_filters(fc, ref, files["filters"], f"{name}, trained with fastconv layers")
            idx = 0
            image = data[2][idx:idx + 1].to(device=device, dtype=dtype)
            files["feature_maps"] = os.path.join(args.out, f"{name}_feature_maps.png")
            summary["feature_map_stages"] = plot_feature_maps(
                fc, image, data[4][idx], int(data[3][idx]), int(runs[1].preds[idx]),
                files["feature_maps"],
                f"{name}, trained with fastconv layers: test image {idx}")
            files["confusion"] = os.path.join(args.out, f"{name}_confusion.png")
            summary["confusion_matrix"] = plot_confusion(
                data[3], runs[1].preds, files["confusion"],
                f"{name} (fastconv run): confusion matrix")
        summary["files"] = files
        results.append(summary)
    total = time.perf_counter() - t_start
    doc = {
        "settings": {
            "models": names, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "momentum": 0.9, "optimizer": "SGD", "lr_schedule": "cosine per step",
            "seed": args.seed,
            "limit": args.limit, "dtype": args.dtype, "device": str(device),
            "control": bool(args.control),
            "input_size": [1, INPUT_SIZE, INPUT_SIZE], "split_seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
            "train_images": len(data[1]), "test_images": len(data[3]),
        },
        "environment": _environment(device),
        "models": results,
        "max_abs_loss_diff": max(r["max_abs_loss_diff"] for r in results),
        "lockstep_fastconv_max_rel_grad_err": max(r["lockstep_fastconv_max_rel_grad_err"]
                                                  for r in results),
        "tolerance": results[0]["tolerance"],
        "within_tolerance": all(r["within_tolerance"] for r in results),
        "total_time_s": total,
    }
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {path}" + ("" if args.no_plots else
                                 " and the PNGs (curves, filters, feature maps, confusion) to "
                                 f"{args.out}") + f"; total {total:.1f}s")
    if not doc["within_tolerance"]:
        print("fastconv demo: warning: torch.nn and fastconv layers differ by more than "
              "floating-point rounding explains; see summary.json", file=sys.stderr)
        return 1
    return 0
