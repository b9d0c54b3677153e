"""``make demo``: the whole pipeline on a real, trained model and real labelled images.

scikit-learn ships 1,797 real 8x8 handwritten digits. We write them as PNG files in the
torchvision ImageFolder layout, train our resnet18 on 1,000 of them for a few seconds, then run
every stage with the training split as calibration data and the 797 held-out digits as the
accuracy set. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_path, ensure_dir
from rexport.core.preprocess import PreprocessSpec

DIGITS_SPEC = PreprocessSpec(input_size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                             labels=tuple(str(d) for d in range(10)))
TRAIN_COUNT = 1000


@dataclass(frozen=True)
class DigitsData:
    train: Path
    val: Path
    n_train: int
    n_val: int


def write_digits(root: str | os.PathLike, *, size: int = 32, seed: int = 0) -> DigitsData:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<index>.png`` (grey, ``size`` px)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits demo needs scikit-learn", "pip install 'rexport[dev]'") from None
    from PIL import Image

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    root = Path(root)
    counts = {"train": 0, "val": 0}
    for rank, i in enumerate(order):
        split = "train" if rank < TRAIN_COUNT else "val"
        img = Image.fromarray((digits.images[i] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        path = root / split / str(int(digits.target[i])) / f"{int(i):04d}.png"
        if not path.exists():
            ensure_dir(path.parent)
            with atomic_path(path, suffix=".png") as tmp:
                img.save(tmp, format="PNG")
        counts[split] += 1
    return DigitsData(root / "train", root / "val", counts["train"], counts["val"])


def load_folder(root: Path, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    from rexport.core.preprocess import list_images

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    xs, ys = [], []
    for idx, cls in enumerate(classes):
        for f in list_images(root / cls):
            xs.append(spec.load_image(f))
            ys.append(idx)
    return np.stack(xs), np.asarray(ys)


def train_digits(data: DigitsData, checkpoint: str | os.PathLike, *, epochs: int = 8, seed: int = 0,
                 spec: PreprocessSpec | None = None, threads: int | None = None) -> dict:
    """Train resnet18 (10 classes) on the training split, preprocessed as ``spec`` (DIGITS_SPEC by
    default) exactly as the export will record it, and save a plain state dict. Returns the training
    accuracy log. ``threads`` fixes torch's thread count for the training: a CPU's float sums depend on
    how the work is split, so the same seed gives the same weights only at the same thread count."""
    import torch

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(data, checkpoint, epochs, seed, spec or DIGITS_SPEC)
    finally:
        torch.set_num_threads(saved_threads)


def _train(data: DigitsData, checkpoint: str | os.PathLike, epochs: int, seed: int, spec: PreprocessSpec) -> dict:
    import torch

    from rexport.models.resnet import resnet18

    torch.manual_seed(seed)
    x, y = load_folder(data.train, spec)
    model = resnet18(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(x) / 64))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    log = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        correct = 0
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            xb, yb = xt[idx], yt[idx]
            # small random shifts: a little augmentation keeps BN statistics honest
            shift = int(torch.randint(-2, 3, (1,), generator=gen))
            xb = torch.roll(xb, shifts=shift, dims=3)
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == yb).sum())
        log.append({"epoch": epoch + 1, "train_accuracy": correct / len(xt)})
    model.eval()
    with atomic_path(checkpoint, suffix=".pth") as tmp:
        torch.save(model.state_dict(), tmp)
    return {"epochs": log}


def outlier_twin(checkpoint: str | os.PathLike, out: str | os.PathLike, *, block: str = "layer2.0",
                 channel: int = 3, factor: float = 200.0) -> str:
    """Write the FP32-equivalent twin of a resnet checkpoint with one outlier channel: ``block``'s first
    BN scales ``channel`` by ``factor`` (relu(kx) = k relu(x) for k > 0) and its conv2 divides the matching
    input weights by it. Trained networks often carry such channels; plain min-max INT8 does not survive
    them. Returns the name of the layer whose input carries the outlier."""
    import torch

    if factor <= 0:
        raise InputError(f"outlier factor must be positive, got {factor}", "pass a factor > 0")
    sd = torch.load(checkpoint)
    sd[f"{block}.bn1.weight"][channel] *= factor
    sd[f"{block}.bn1.bias"][channel] *= factor
    sd[f"{block}.conv2.weight"][:, channel] /= factor
    with atomic_path(out, suffix=".pth") as tmp:
        torch.save(sd, tmp)
    return f"{block}.conv2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="artifacts/demo")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    from rexport.cli import main as cli_main

    out = Path(args.out)
    data = write_digits(out / "digits")
    ckpt = out / "digits_resnet18.pth"
    if not ckpt.exists():
        print(f"training resnet18 on {data.n_train} real handwritten digits ({args.epochs} epochs)...", flush=True)
        log = train_digits(data, ckpt, epochs=args.epochs)
        print(f"  train accuracy {log['epochs'][-1]['train_accuracy']:.1%}", flush=True)
    labels = out / "digits_labels.txt"
    labels.write_text("\n".join(DIGITS_SPEC.labels) + "\n")
    import sys

    sys.argv = ["rexport", "run", "--model", "resnet18", "--weights", str(ckpt), "--labels", str(labels),
                "--input-size", "32", "--resize", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                "--calib-data", str(data.train), "--calib-samples", str(data.n_train),
                "--val-data", str(data.val), "--out", str(out / "run")]
    cli_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
