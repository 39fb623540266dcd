#!/usr/bin/env python3
"""Writes the golden fixtures that `worker/tests/contrastive.rs` compares butler's contrastive losses and
LARS to.

Usage: .venv/bin/python scripts/fixtures_contrastive.py worker/tests/fixtures

References are plain PyTorch written independently of the Rust code: NT-Xent as the usual similarity
matrix with the diagonal masked and `F.cross_entropy` against the other view's index; CPC's InfoNCE as a
Python loop over horizons and time steps with `F.cross_entropy`; LARS as the update rule written out per
parameter. Losses are stored in float32 and float64 (inputs cast up), NT-Xent's gradient in float64.
Rerunning the script rewrites the same file (inputs come from torch.manual_seed).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def scalar(t):
    return t.detach().reshape(()).contiguous().clone()


def nt_xent_reference(z1, z2, tau):
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def ntxent():
    torch.manual_seed(2020)
    n, d = 8, 16
    raw1, raw2 = torch.randn(n, d), torch.randn(n, d)
    out = {"raw1": raw1, "raw2": raw2}
    out["norm1"] = F.normalize(raw1, dim=1)
    for tau in ["0.1", "0.5"]:
        for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            a = F.normalize(raw1.to(dtype), dim=1)
            b = F.normalize(raw2.to(dtype), dim=1)
            out[f"ntxent/tau{tau}/{name}"] = scalar(nt_xent_reference(a, b, float(tau)))
    # Gradient through the normalisation, float64.
    a = raw1.double().requires_grad_(True)
    b = raw2.double().requires_grad_(True)
    loss = nt_xent_reference(F.normalize(a, dim=1), F.normalize(b, dim=1), 0.5)
    loss.backward()
    out["ntxent/grad1"] = a.grad.clone()
    out["ntxent/grad2"] = b.grad.clone()
    return out


def cpc():
    torch.manual_seed(2018)
    n, t, c, k = 6, 5, 8, 2
    z = torch.randn(n, t, c)
    preds = [torch.randn(n, t - h, c) for h in range(1, k + 1)]
    out = {"cpc/z": z}
    for h, p in enumerate(preds, start=1):
        out[f"cpc/pred{h}"] = p
    for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
        total, count = 0.0, 0
        for h, p in enumerate(preds, start=1):
            for s in range(t - h):
                logits = p[:, s].to(dtype) @ z[:, s + h].to(dtype).T
                total = total + F.cross_entropy(logits, torch.arange(n), reduction="sum")
                count += n
        out[f"cpc/loss/{name}"] = scalar(total / count)
    return out


def lars():
    torch.manual_seed(1703)
    lr_steps = [0.5, 1.0, 0.8]
    momentum, wd, eta = 0.9, 0.01, 0.02
    w = torch.randn(4, 3).double()
    b = torch.randn(4).double()
    out = {"lars/w0": w.float(), "lars/b0": b.float(), "lars/lrs": torch.tensor(lr_steps)}
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for i, lr in enumerate(lr_steps):
        gw, gb = torch.randn(4, 3).float(), torch.randn(4).float()
        out[f"lars/gw{i}"], out[f"lars/gb{i}"] = gw, gb
        gw, gb = gw.double(), gb.double()
        # Weights: decay, then layer-wise trust ratio eta * |w| / |g + wd w|.
        u = gw + wd * w
        trust = eta * w.norm() / u.norm()
        vw = momentum * vw + trust * u
        w = w - lr * vw
        # Biases (1-D): neither decayed nor adapted.
        vb = momentum * vb + gb
        b = b - lr * vb
        out[f"lars/w{i + 1}"], out[f"lars/b{i + 1}"] = w.float(), b.float()
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    tensors = {**ntxent(), **cpc(), **lars()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(outdir / "contrastive.safetensors"))
    print(f"wrote {len(tensors)} tensors to {outdir / 'contrastive.safetensors'}")


if __name__ == "__main__":
    main()
