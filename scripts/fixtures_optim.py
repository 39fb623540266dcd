#!/usr/bin/env python3
"""Writes the golden fixtures that `worker/tests/optim_golden.rs` compares butler's SGD, Adam and AdamW to.

Usage: .venv/bin/python -P scripts/fixtures_optim.py worker/tests/fixtures
(-P: scripts/ssl.py would otherwise shadow the standard library's ssl module that torch imports.)

The reference is `torch.optim` itself (CPU, the single-tensor path: foreach=False): two parameters (a
matrix and a vector) take 5 steps with fixed gradient sequences; the fixture holds the initial
parameters, the gradients, the learning rate of each step (a schedule changes it between steps, as
butler's does) and, after every step, the parameters and the optimizer's state (momentum buffer, or
Adam's exp_avg / exp_avg_sq). Rerunning the script rewrites the same file (torch.manual_seed).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

STEPS = 5
CASES = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=5e-4)),
    "sgd_plain": (torch.optim.SGD, dict(momentum=0.0, weight_decay=0.0)),
    "sgd_nesterov": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adam": (torch.optim.Adam, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    "adam_l2": (torch.optim.Adam, dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)),
}
LRS = [0.1, 0.05, 0.05, 0.02, 0.01]


def main(out_dir):
    torch.manual_seed(7)
    w0 = torch.randn(4, 3)
    b0 = torch.randn(3)
    grads = [(torch.randn(4, 3), torch.randn(3)) for _ in range(STEPS)]
    out = {"w0": w0, "b0": b0, "lrs": torch.tensor(LRS, dtype=torch.float64)}
    for k, (gw, gb) in enumerate(grads):
        out[f"grad/{k}/w"] = gw
        out[f"grad/{k}/b"] = gb
    for name, (cls, kw) in CASES.items():
        w = w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        opt = cls([w, b], lr=LRS[0], foreach=False, **kw)
        for k, (gw, gb) in enumerate(grads):
            for g in opt.param_groups:
                g["lr"] = LRS[k]
            w.grad = gw.clone()
            b.grad = gb.clone()
            opt.step()
            out[f"{name}/{k}/w"] = w.detach().clone()
            out[f"{name}/{k}/b"] = b.detach().clone()
            for pname, p in [("w", w), ("b", b)]:
                for slot, t in opt.state[p].items():
                    if slot == "step":
                        continue
                    if t is not None:
                        out[f"{name}/{k}/{pname}/{slot}"] = t.detach().clone()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(Path(out_dir) / "optim.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "worker/tests/fixtures")
