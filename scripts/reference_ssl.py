"""A plain PyTorch implementation of the MNIST-1D 40-labels-per-class setups, the yardstick of butler's
semi-supervised recipes (issue 11): the same ConvBase, the same augmentations (weak: a circular shift by
at most 4; strong: a shift by at most 10, amplitude scale 0.4, shear 0.75, i.i.d. noise 0.02), Adam with
linear warmup + cosine, one process, one CPU thread. A few dozen lines per method, nothing shared with
butler but the data files.

usage: python -P scripts/reference_ssl.py METHOD [--steps N] [--seed S] [--data data/mnist1d] [--ema D]
       METHOD: supervised | augmented | uda | fixmatch
prints one JSON line: {"method", "seed", "steps", "val_accuracy", "test_accuracy", "seconds"}
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file


def load_split(root, split):
    """All samples of a butler split (its shards, in order) as (x float32 [N, L], y int64 [N])."""
    man = json.load(open(os.path.join(root, "manifest.json")))
    xs, ys = [], []
    for sh in man["splits"][split]["shards"]:
        t = load_file(os.path.join(root, sh["path"]))
        xs.append(t["x"].reshape(t["x"].shape[0], -1).astype(np.float32))
        ys.append(t["y"].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class ConvBase(nn.Module):
    def __init__(self, length=40, c=25, classes=10):
        super().__init__()
        self.c1 = nn.Conv1d(1, c, 5, stride=2, padding=1)
        self.c2 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.fc = nn.Linear(c * n, classes)

    def forward(self, x):
        h = x.unsqueeze(1)
        for conv in (self.c1, self.c2, self.c3):
            h = F.relu(conv(h))
        return self.fc(h.flatten(1))


def roll(x, max_shift, g):
    k = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=g)
    idx = (torch.arange(x.shape[1]).unsqueeze(0) - k.unsqueeze(1)) % x.shape[1]
    return torch.gather(x, 1, idx)


def weak(x, g):
    return roll(x, 4, g)


def strong(x, g):
    n, l = x.shape
    x = roll(x, 10, g)
    x = x * (1 + 0.4 * (torch.rand(n, 1, generator=g) - 0.5))
    ramp = torch.linspace(-0.5, 0.5, l).unsqueeze(0)
    x = x - 0.75 * (torch.rand(n, 1, generator=g) - 0.5) * ramp
    return x + 0.02 * torch.randn(n, l, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["supervised", "augmented", "uda", "fixmatch"])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="data/mnist1d")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--mu", type=int, default=None)
    ap.add_argument("--ema", type=float, default=None)
    ap.add_argument("--labeled-aug", choices=["weak", "strong"], default="weak")
    ap.add_argument("--val", type=int, default=0, help="hold out this many train samples for validation")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    x, y = load_split(a.data, "train")
    xt, yt = load_split(a.data, "test")
    perm = rng.permutation(len(x))
    val_idx, rest = perm[: a.val], perm[a.val :]
    lab = np.concatenate([rest[y[rest] == c][: a.per_class] for c in range(10)])
    xl, yl = torch.from_numpy(x[lab]), torch.from_numpy(y[lab])
    xu = torch.from_numpy(x[rest])
    mu = a.mu if a.mu is not None else {"uda": 3, "fixmatch": 7}.get(a.method, 0)

    model = ConvBase(x.shape[1])
    ema = None
    if a.ema:
        ema = ConvBase(x.shape[1])
        ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, a.steps - warm))))
    )
    t0 = time.time()
    for step in range(a.steps):
        i = torch.randint(0, len(xl), (a.batch,), generator=g)
        xb, yb = xl[i], yl[i]
        if a.method != "supervised":
            xb = weak(xb, g) if a.labeled_aug == "weak" else strong(xb, g)
        if mu:
            u = xu[torch.randint(0, len(xu), (a.batch * mu,), generator=g)]
            uw = weak(u, g) if a.method == "fixmatch" else u
            us = strong(u, g)
            logits = model(torch.cat([xb, uw, us]))
            lx, lw, ls = logits[: a.batch], logits[a.batch : a.batch + len(u)], logits[a.batch + len(u) :]
            loss = F.cross_entropy(lx, yb)
            if a.method == "fixmatch":
                p = lw.detach().softmax(-1)
                conf, pl = p.max(-1)
                loss = loss + (F.cross_entropy(ls, pl, reduction="none") * (conf >= 0.95).float()).mean()
            else:  # UDA: sharpen with T = 0.4, mask below confidence 0.8, KL(target || strong)
                p = lw.detach().softmax(-1)
                mask = (p.max(-1).values >= 0.8).float()
                tgt = (lw.detach() / 0.4).softmax(-1)
                kl = (tgt * (tgt.clamp_min(1e-12).log() - ls.log_softmax(-1))).sum(-1)
                loss = loss + (kl * mask).mean()
        else:
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(a.ema).add_(pm, alpha=1 - a.ema)
    m = ema if ema is not None else model

    def acc(xs, ys):
        with torch.no_grad():
            return (m(torch.from_numpy(xs)).argmax(-1).numpy() == ys).mean().item() if len(xs) else None

    print(json.dumps({"method": a.method, "seed": a.seed, "steps": a.steps, "val_accuracy": acc(x[val_idx], y[val_idx]),
                      "test_accuracy": acc(xt, yt), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
