#!/usr/bin/env python3
"""Writes the golden fixture that `worker/tests/usb_golden.rs` compares butler's USB methods to.

Usage: .venv/bin/python -P scripts/fixtures_usb.py worker/tests/fixtures
(`-P`: scripts/ssl.py would otherwise shadow the standard library's ssl module.)

For each case (a method with its options) the script draws a few steps of random weak/strong logits (and,
for FlexMatch, sample ids from a pool of non-contiguous ids), runs a plain-PyTorch implementation of the
method written from the papers (and USB's hooks where the papers leave a detail open), and stores, per
step: the inputs, the unsupervised loss averaged over the batch, the per-sample mask or weight, and the
method's state after the step, under the names butler's `Objective::state` uses. Deliberately wrong
variants (no threshold warm-up, USB's n_sigma = 2, updating after masking, ...) are stored too, so the
Rust test can show that the comparison tells them apart.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

K = 5  # classes
B = 8  # unlabeled samples per step
STEPS = 6
POOL = 24  # FlexMatch's N (a second FlexMatch case uses a pool of 10, which fills up)
ID_BASE = 1000  # sample ids are not 0..N in butler (they are stable across the manifest)


def ce_hard(probs, strong):
    return F.cross_entropy(strong, probs.argmax(dim=-1), reduction="none")


class DistAlign:
    """ReMixMatch distribution alignment, uniform target, EMA of the mean prediction from the first batch."""

    def __init__(self, momentum):
        self.m = momentum
        self.p_model = None

    def __call__(self, probs):
        mean = probs.mean(dim=0)
        self.p_model = mean if self.p_model is None else self.p_model * self.m + mean * (1 - self.m)
        p_target = torch.ones(K) / K
        aligned = probs * (p_target + 1e-6) / (self.p_model + 1e-6)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def state(self):
        return {"da.p_model": self.p_model.clone()}


def fixed(tau, da=None):
    def step(weak, strong, ids):
        probs = torch.softmax(weak, dim=-1)
        if da is not None:
            probs = da(probs)
        mask = (probs.max(dim=-1).values >= tau).float()
        return ce_hard(probs, strong), mask, {}

    return step


def uda(temperature, beta, da):
    def step(weak, strong, ids):
        probs = da(torch.softmax(weak, dim=-1))
        target = probs ** (1.0 / temperature)
        target = target / target.sum(dim=-1, keepdim=True)
        log_q = torch.log_softmax(strong, dim=-1)
        kl = (target * (torch.log(target) - log_q)).sum(dim=-1)
        mask = (probs.max(dim=-1).values > beta).float()
        return kl, mask, {}

    return step


class FlexMatch:
    """Curriculum thresholds: the learning status before the step, then the step's confident samples."""

    def __init__(self, tau, pool=POOL, warmup=True):
        self.tau = tau
        self.warmup = warmup
        self.selected = torch.full((pool,), -1, dtype=torch.long)

    def beta(self):
        sigma = torch.tensor([(self.selected == c).sum().item() for c in range(K)], dtype=torch.float64)
        unused = (self.selected == -1).sum().item()
        denom = max(sigma.max().item(), unused) if self.warmup else sigma.max().item()
        return sigma / denom if denom > 0 else torch.zeros(K, dtype=torch.float64)

    def __call__(self, weak, strong, ids):
        probs = torch.softmax(weak, dim=-1)
        conf, pseudo = probs.max(dim=-1)
        beta = self.beta()
        thresholds = (self.tau * beta / (2.0 - beta)).float()
        mask = (conf >= thresholds[pseudo]).float()
        confident = conf >= self.tau
        self.selected[ids[confident] - ID_BASE] = pseudo[confident]
        return ce_hard(probs, strong), mask, {}

    def state(self):
        kept = (self.selected >= 0).nonzero().flatten()
        if kept.numel() == 0:
            return {}
        return {
            "flexmatch.ids": kept + ID_BASE,
            "flexmatch.classes": self.selected[kept].clone(),
        }


class FreeMatch:
    def __init__(self, momentum, update_first=True):
        self.m = momentum
        self.update_first = update_first
        self.p_model = torch.ones(K) / K
        self.time_p = self.p_model.mean()

    def update(self, probs):
        self.time_p = self.time_p * self.m + (1 - self.m) * probs.max(dim=-1).values.mean()
        self.p_model = self.p_model * self.m + (1 - self.m) * probs.mean(dim=0)

    def __call__(self, weak, strong, ids):
        probs = torch.softmax(weak, dim=-1)
        if self.update_first:
            self.update(probs)
        conf, pseudo = probs.max(dim=-1)
        modulation = self.p_model / self.p_model.max()
        mask = (conf >= self.time_p * modulation[pseudo]).float()
        if not self.update_first:
            self.update(probs)
        return ce_hard(probs, strong), mask, {}

    def state(self):
        return {"freematch.time_p": self.time_p.reshape(1).clone(), "freematch.p_model": self.p_model.clone()}


class SoftMatch:
    """Truncated Gaussian weights; mean and variance EMAs kept as Python floats (double), as USB does."""

    def __init__(self, momentum, da=None, n_sigma=1.0):
        self.m = momentum
        self.da = da
        self.n_sigma = n_sigma
        self.mu = 1.0 / K
        self.var = 1.0

    def __call__(self, weak, strong, ids):
        probs = torch.softmax(weak, dim=-1)
        if self.da is not None:
            probs = self.da(probs)
        conf = probs.max(dim=-1).values
        self.mu = self.m * self.mu + (1 - self.m) * conf.mean().item()
        self.var = self.m * self.var + (1 - self.m) * torch.var(conf, unbiased=True).item()
        below = torch.clamp(conf - self.mu, max=0.0)
        weight = torch.exp(-(below**2) / (2 * self.var / self.n_sigma**2))
        return ce_hard(probs, strong), weight, {}

    def state(self):
        return {"softmatch.moments": torch.tensor([self.mu, self.var], dtype=torch.float64)}


def pi_model(weak, strong, ids):
    target = torch.softmax(weak, dim=-1)
    mse = F.mse_loss(torch.softmax(strong, dim=-1), target, reduction="none").mean(dim=1)
    return mse, torch.ones(B), {}


def run(name, method, state, out, variants=(), pool=POOL):
    """Steps `method` over seeded logits; `variants` are (label, method) drifts stored as masks only."""
    torch.manual_seed(sum(map(ord, name)))
    for t in range(STEPS):
        # Per-sample scales spread the confidences, so that thresholds and weights bite.
        weak = torch.randn(B, K) * (torch.rand(B, 1) * 3.0 + 0.2)
        strong = torch.randn(B, K) * 1.5
        ids = torch.randperm(pool)[:B] + ID_BASE
        loss, mask, _ = method(weak, strong, ids)
        p = f"{name}/step{t}"
        out[f"{p}/weak"] = weak
        out[f"{p}/strong"] = strong
        out[f"{p}/ids"] = ids
        out[f"{p}/loss"] = (loss * mask).mean().reshape(())
        out[f"{p}/mask"] = mask
        for key, value in state().items():
            out[f"{p}/state/{key}"] = value
        for label, drift in variants:
            _, drift_mask, _ = drift(weak, strong, ids)
            out[f"{p}/drift/{label}"] = drift_mask
    out[f"{name}/pool"] = torch.tensor(pool)


def main(dest):
    out = {}
    run("fixmatch_da", fixed(0.6, da := DistAlign(0.9)), da.state, out)
    run("uda_da", uda(0.5, 0.5, da := DistAlign(0.9)), da.state, out)
    flex = FlexMatch(0.6)
    run("flexmatch", flex, flex.state, out, [("no_warmup", FlexMatch(0.6, warmup=False))])
    small = FlexMatch(0.6, pool=10)
    run("flexmatch_small", small, small.state, out, pool=10)
    free = FreeMatch(0.5)
    run("freematch", free, free.state, out, [("update_after", FreeMatch(0.5, update_first=False))])
    soft = SoftMatch(0.5)
    run("softmatch", soft, soft.state, out, [("n_sigma_2", SoftMatch(0.5, n_sigma=2.0))])
    soft_ua = SoftMatch(0.5, da=DistAlign(0.9))
    run(
        "softmatch_ua",
        soft_ua,
        lambda: {**soft_ua.state(), **soft_ua.da.state()},
        out,
    )
    run("pi_model", pi_model, dict, out)
    out = {k: v.contiguous() for k, v in out.items()}
    Path(dest).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(dest) / "usb.safetensors"))
    print(f"wrote {len(out)} tensors to {Path(dest) / 'usb.safetensors'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "worker/tests/fixtures")
