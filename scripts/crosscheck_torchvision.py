"""Prove our ResNets are torchvision's, then freeze their state-dict layout as a test fixture.

Needs torchvision, which rexport itself does not depend on, so run it in a separate venv:

    python3 -m venv /tmp/tvvenv
    /tmp/tvvenv/bin/pip install torch torchvision numpy safetensors
    /tmp/tvvenv/bin/pip install -e . --no-deps --no-build-isolation
    /tmp/tvvenv/bin/python scripts/crosscheck_torchvision.py

For every architecture in MODELS it builds torchvision's model (weights=None, seeded), gives its
BatchNorms non-trivial statistics so that every normalisation is exercised, loads that state dict
into ours with strict=True and compares logits on a seeded input. It also compares keys, shapes,
parameter counts, seeded initialisation and zero_init_residual, prints a table, exits 1 if any
check fails, and otherwise writes models/torchvision_reference.json (the CPU tests' fixture).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from rexport.models.resnet import MODELS

FIXTURE = Path(__file__).resolve().parent.parent / "models" / "torchvision_reference.json"
REL_TOL = 1e-5


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Default BN init is identity in eval mode; random statistics make a misplaced BN visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)


def shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def zeroed_keys(model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if k.endswith(".weight") and v.dim() == 1 and not v.any()}


def check(arch: str, seed: int, size: int) -> dict:
    tv_build = getattr(torchvision.models, arch)
    torch.manual_seed(seed)
    theirs = tv_build(weights=None).eval()
    torch.manual_seed(seed)
    ours = MODELS[arch]().eval()

    same_init = all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))
    keys_equal = list(shapes(theirs).items()) == list(shapes(ours).items())  # same keys, order and shapes
    n_theirs = sum(p.numel() for p in theirs.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    zero_init_equal = zeroed_keys(tv_build(weights=None, zero_init_residual=True)) == \
        zeroed_keys(MODELS[arch](zero_init_residual=True))

    randomize_batchnorm(theirs, seed)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref, out = theirs(x), ours(x)
    max_abs = (ref - out).abs().max().item()
    max_rel = max_abs / max(ref.abs().max().item(), 1e-12)
    ok = keys_equal and n_theirs == n_ours and zero_init_equal and max_rel < REL_TOL
    return {
        "ok": ok, "same_init": same_init, "keys_equal": keys_equal, "zero_init_equal": zero_init_equal,
        "num_params": n_ours, "num_params_torchvision": n_theirs, "max_abs_diff": max_abs,
        "max_rel_diff": max_rel, "logit_scale": ref.abs().max().item(), "keys": shapes(ours),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--out", type=Path, default=FIXTURE)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, input 2x3x{args.size}x{args.size}")
    header = f"{'arch':<17} {'params':>11} {'keys':>5} {'layout':>6} {'init':>5} {'zero':>5} " \
             f"{'max abs':>9} {'max rel':>9} {'time':>6}  result"
    print(header)
    print("-" * len(header))
    results, failed = {}, []
    for arch in MODELS:
        t0 = time.perf_counter()
        r = check(arch, args.seed, args.size)
        results[arch] = r
        yes = {True: "same", False: "DIFF"}
        print(f"{arch:<17} {r['num_params']:>11,} {len(r['keys']):>5} {yes[r['keys_equal']]:>6} "
              f"{yes[r['same_init']]:>5} {yes[r['zero_init_equal']]:>5} {r['max_abs_diff']:>9.2e} "
              f"{r['max_rel_diff']:>9.2e} {time.perf_counter() - t0:>5.1f}s  {'ok' if r['ok'] else 'FAIL'}")
        if not r["ok"]:
            failed.append(arch)
    if failed:
        print(f"FAILED: {', '.join(failed)}; {args.out} not written", file=sys.stderr)
        return 1

    fixture = {
        "generated_by": "scripts/crosscheck_torchvision.py",
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "seed": args.seed, "input_shape": [2, 3, args.size, args.size], "rel_tol": REL_TOL,
        "models": {arch: {"num_params": r["num_params"], "max_abs_diff": r["max_abs_diff"],
                          "max_rel_diff": r["max_rel_diff"], "keys": r["keys"]}
                   for arch, r in results.items()},
    }
    args.out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
