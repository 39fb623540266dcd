#!/usr/bin/env python3
"""Writes the golden fixtures that `worker/tests/golden.rs` compares butler's losses and mixing functions to.

Usage: .venv/bin/python scripts/fixtures.py worker/tests/fixtures

Every reference output comes from PyTorch's own functions (F.cross_entropy, F.kl_div, ...) or, for the
mixing methods, from straightforward Python indexing written independently of the Rust code, so that a
formula drifting on either side shows up as a mismatch. Inputs are drawn with torch.manual_seed and stored
next to the outputs, so the Rust tests never run Python (CI runs only `cargo test`); rerunning this script
rewrites the same files. Losses are stored twice: computed in float32 from the float32 inputs (the dtype
butler trains in) and in float64 from the same inputs cast to float64 (a much tighter check of the
formula itself).
"""

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def scalar(t):
    """A 0-dim tensor, contiguous and detached, as safetensors wants it."""
    return t.detach().reshape(()).contiguous().clone()


def losses():
    torch.manual_seed(1234)
    b, k = 6, 10
    logits = torch.randn(b, k) * 2.0
    labels = torch.randint(0, k, (b,))
    ignored = labels.clone()
    ignored[2] = -100  # torch's default ignore_index: excluded from the mean, smoothing included
    probs = torch.softmax(torch.randn(b, k) * 1.5, dim=-1)
    out = {
        "logits": logits,
        "labels": labels,
        "labels_ignore": ignored,
        "probs": probs,
    }
    for eps in ["0", "0.1", "0.3"]:
        e = float(eps)
        for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            z = logits.to(dtype)
            out[f"ce_hard/eps{eps}/{name}"] = scalar(F.cross_entropy(z, labels, label_smoothing=e))
            out[f"ce_hard_ignore/eps{eps}/{name}"] = scalar(
                F.cross_entropy(z, ignored, label_smoothing=e)
            )
    for eps in ["0", "0.1"]:
        e = float(eps)
        for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            out[f"ce_soft/eps{eps}/{name}"] = scalar(
                F.cross_entropy(logits.to(dtype), probs.to(dtype), label_smoothing=e)
            )
    return out


def kd():
    torch.manual_seed(99)
    b, k = 6, 10
    student = torch.randn(b, k) * 2.0
    teacher = torch.randn(b, k) * 3.0
    # Soft targets as mixing methods produce them: two one-hots blended with a per-batch lambda.
    labels = torch.randint(0, k, (b,))
    one_hot = F.one_hot(labels, k).float()
    targets = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    out = {"student": student, "teacher": teacher, "targets": targets}
    for temp in ["1", "2", "4"]:
        t = float(temp)
        for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            s, te, y = student.to(dtype), teacher.to(dtype), targets.to(dtype)
            kl = F.kl_div(F.log_softmax(s / t, dim=-1), F.softmax(te / t, dim=-1), reduction="batchmean")
            out[f"kd_unlabeled/T{temp}/{name}"] = scalar(t * t * kl)
            for alpha in ["0", "0.5", "0.9"]:
                a = float(alpha)
                for eps in ["0", "0.1"]:
                    ce = F.cross_entropy(s, y, label_smoothing=float(eps))
                    loss = a * ce + (1.0 - a) * t * t * kl
                    out[f"kd/T{temp}/a{alpha}/eps{eps}/{name}"] = scalar(loss)
    return out


def mixup():
    torch.manual_seed(7)
    out = {}
    for case, b in [("b5", 5), ("b1", 1)]:
        x = torch.randn(b, 3, 7)
        y = torch.softmax(torch.randn(b, 4), dim=-1)
        lam = 0.3
        # Pairing by reversing the batch: sample i with sample b-1-i (the middle of an odd batch with itself).
        partner_x = torch.stack([x[b - 1 - i] for i in range(b)])
        partner_y = torch.stack([y[b - 1 - i] for i in range(b)])
        out[f"mixup/{case}/x"] = x
        out[f"mixup/{case}/y"] = y
        out[f"mixup/{case}/lam"] = torch.tensor(lam, dtype=torch.float64)
        out[f"mixup/{case}/x_out"] = lam * x + (1.0 - lam) * partner_x
        out[f"mixup/{case}/y_out"] = lam * y + (1.0 - lam) * partner_y
    return out


def clip(v, lo, hi):
    return max(lo, min(hi, v))


def exact_span(centre, size, length):
    """butler's rule for 1-D CutMix spans and cutout holes: size `size` starting at centre - size // 2,
    clipped to [0, length)."""
    start = centre - size // 2
    return clip(start, 0, length), clip(start + size, 0, length)


def cutmix():
    torch.manual_seed(21)
    b = 5
    out = {}
    y = torch.softmax(torch.randn(b, 4), dim=-1)
    out["cutmix/y"] = y
    partner_y = torch.stack([y[b - 1 - i] for i in range(b)])

    # 1-D: [B, C, L] and [B, L] layouts, the span pasted from the reversed batch.
    length = 16
    x_bcl = torch.randn(b, 3, length)
    x_bl = torch.randn(b, length)
    out["cutmix1d/x_bcl"] = x_bcl
    out["cutmix1d/x_bl"] = x_bl
    # (centre, size): interior, clipped at the right border, clipped at the left border, empty, whole.
    cases = [(7, 6), (14, 6), (1, 5), (3, 0), (8, 16)]
    for i, (centre, size) in enumerate(cases):
        start, end = exact_span(centre, size, length)
        lam = 1.0 - (end - start) / length
        out[f"cutmix1d/c{i}/centre_size"] = torch.tensor([centre, size], dtype=torch.int64)
        out[f"cutmix1d/c{i}/span"] = torch.tensor([start, end], dtype=torch.int64)
        out[f"cutmix1d/c{i}/lam"] = torch.tensor(lam, dtype=torch.float64)
        for layout, x in [("bcl", x_bcl), ("bl", x_bl)]:
            mixed = x.clone()
            for n in range(b):
                for j in range(start, end):
                    mixed[n, ..., j] = x[b - 1 - n, ..., j]
            out[f"cutmix1d/c{i}/{layout}/x_out"] = mixed
        out[f"cutmix1d/c{i}/y_out"] = lam * y + (1.0 - lam) * partner_y

    # 2-D: [B, C, H, W]; the box follows the CutMix reference implementation's rule
    # (x1 = clip(cx - cut_w // 2), x2 = clip(cx + cut_w // 2), the same for y).
    h, w = 8, 10
    x = torch.randn(b, 3, h, w)
    out["cutmix2d/x"] = x
    # (cy, cx, cut_h, cut_w): interior, clipped at two borders with odd cuts, a centre on the corner.
    cases = [(4, 3, 4, 4), (7, 0, 5, 5), (0, 9, 8, 10), (5, 5, 2, 6)]
    for i, (cy, cx, cut_h, cut_w) in enumerate(cases):
        y1, y2 = clip(cy - cut_h // 2, 0, h), clip(cy + cut_h // 2, 0, h)
        x1, x2 = clip(cx - cut_w // 2, 0, w), clip(cx + cut_w // 2, 0, w)
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        mixed = x.clone()
        mixed[:, :, y1:y2, x1:x2] = x.flip(0)[:, :, y1:y2, x1:x2]
        out[f"cutmix2d/c{i}/centre_cut"] = torch.tensor([cy, cx, cut_h, cut_w], dtype=torch.int64)
        out[f"cutmix2d/c{i}/box"] = torch.tensor([y1, y2, x1, x2], dtype=torch.int64)
        out[f"cutmix2d/c{i}/lam"] = torch.tensor(lam, dtype=torch.float64)
        out[f"cutmix2d/c{i}/x_out"] = mixed
        out[f"cutmix2d/c{i}/y_out"] = lam * y + (1.0 - lam) * partner_y
    return out


def cutout():
    torch.manual_seed(5)
    out = {}
    # 1-D [B, C, L]: per-sample holes (sample, centre, size); sample 1 has none, sample 2 has two
    # overlapping ones, sample 3 one clipped at each border.
    length = 12
    x = torch.randn(4, 2, length)
    holes = [(0, 5, 4), (2, 3, 3), (2, 5, 4), (3, 0, 4), (3, 11, 5)]
    spans = []
    mixed = x.clone()
    for n, centre, size in holes:
        start, end = exact_span(centre, size, length)
        spans.append((n, start, end))
        for j in range(start, end):
            mixed[n, :, j] = 0.0
    out["cutout1d/x"] = x
    out["cutout1d/holes"] = torch.tensor(holes, dtype=torch.int64)
    out["cutout1d/spans"] = torch.tensor(spans, dtype=torch.int64)
    out["cutout1d/x_out"] = mixed

    # 2-D [B, C, H, W]: square holes (sample, cy, cx, size), clipped at the borders.
    h, w = 6, 7
    x = torch.randn(3, 2, h, w)
    holes = [(0, 2, 3, 2), (0, 5, 6, 3), (2, 0, 0, 4), (2, 3, 3, 1)]
    boxes = []
    mixed = x.clone()
    for n, cy, cx, size in holes:
        y1, y2 = exact_span(cy, size, h)
        x1, x2 = exact_span(cx, size, w)
        boxes.append((n, y1, y2, x1, x2))
        for i in range(y1, y2):
            for j in range(x1, x2):
                mixed[n, :, i, j] = 0.0
    out["cutout2d/x"] = x
    out["cutout2d/holes"] = torch.tensor(holes, dtype=torch.int64)
    out["cutout2d/boxes"] = torch.tensor(boxes, dtype=torch.int64)
    out["cutout2d/x_out"] = mixed
    return out


def tsa_threshold(schedule, step, total, k):
    """UDA's Training Signal Annealing threshold (Xie et al. 2020, section 3.2)."""
    frac = min(step / total, 1.0)
    alpha = {"linear": frac, "log": 1.0 - math.exp(-5.0 * frac), "exp": math.exp(5.0 * (frac - 1.0))}[schedule]
    return alpha * (1.0 - 1.0 / k) + 1.0 / k


def masked_means(per_example, mask):
    """The two normalisations of a masked loss: over the whole batch, and over the unmasked examples."""
    return (per_example * mask).mean(), (per_example * mask).sum() / torch.clamp(mask.sum(), min=1.0)


def ssl():
    """UDA (TSA-masked supervised loss, sharpened and confidence-masked consistency) and FixMatch's
    unlabeled loss, from torch's own F.cross_entropy / F.kl_div / softmax."""
    torch.manual_seed(2024)
    b, u, k = 8, 12, 10
    logits = torch.randn(b, k) * 3.0
    labels = torch.randint(0, k, (b,))
    clean = torch.randn(u, k) * 3.0
    aug = clean + torch.randn(u, k)
    out = {"logits": logits, "labels": labels, "clean": clean, "aug": aug}
    for schedule in ["linear", "log", "exp"]:
        for step in [0, 30, 60, 100]:
            eta = tsa_threshold(schedule, step, 100, k)
            out[f"tsa/{schedule}/{step}/eta"] = torch.tensor(eta, dtype=torch.float64)
            for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
                z = logits.to(dtype)
                p_correct = torch.softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
                mask = (p_correct <= eta).to(dtype)
                ce = F.cross_entropy(z, labels, reduction="none")
                out[f"tsa/{schedule}/{step}/mask/{name}"] = mask
                out[f"tsa/{schedule}/{step}/loss/{name}"] = scalar((ce * mask).sum() / torch.clamp(mask.sum(), min=1.0))
    for temp in ["1", "0.4"]:
        for beta in ["0", "0.8"]:
            for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
                c, a = clean.to(dtype), aug.to(dtype)
                log_target = F.log_softmax(c / float(temp), -1)
                kl = F.kl_div(F.log_softmax(a, -1), log_target, reduction="none", log_target=True).sum(-1)
                mask = (torch.softmax(c, -1).max(-1).values > float(beta)).to(dtype)
                batch, masked = masked_means(kl, mask)
                key = f"uda/T{temp}/b{beta}/{name}"
                out[f"{key}/mask"] = mask
                out[f"{key}/batch"] = scalar(batch)
                out[f"{key}/masked"] = scalar(masked)
    for tau in ["0.5", "0.95"]:
        for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
            w, s = clean.to(dtype), aug.to(dtype)
            conf, pseudo = torch.softmax(w, -1).max(-1)
            mask = (conf >= float(tau)).to(dtype)
            ce = F.cross_entropy(s, pseudo, reduction="none")
            batch, masked = masked_means(ce, mask)
            key = f"fixmatch/tau{tau}/{name}"
            out[f"{key}/mask"] = mask
            out[f"{key}/batch"] = scalar(batch)
            out[f"{key}/masked"] = scalar(masked)
    return out


def torchscript_teacher(target):
    """A tiny teacher exported from PyTorch as TorchScript (the other teacher format KD accepts), and its
    logits on fixed inputs, so the Rust side can check it loads and runs the same function."""
    torch.manual_seed(7)
    teacher = torch.nn.Sequential(torch.nn.Linear(40, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    scripted = torch.jit.script(teacher)
    scripted.save(str(target / "teacher.pt"))
    x = torch.randn(3, 40)
    with torch.no_grad():
        return {"teacher/x": x, "teacher/logits": teacher(x)}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: fixtures.py OUTPUT_DIR")
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    files = {"losses": losses(), "kd": {**kd(), **torchscript_teacher(target)}, "mixing": {**mixup(), **cutmix(), **cutout()}, "ssl": ssl()}
    total = 0
    for name, tensors in files.items():
        path = target / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        total += path.stat().st_size
        print(f"{path}: {len(tensors)} tensors, {path.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
