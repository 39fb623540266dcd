"""Benchmark: butler's per-sample augmentation vs torchvision.transforms.v2 on small images.

Both sides work like a DataLoader worker: one process, one thread, one transform call per sample.
torchvision runs the equivalent v2 pipeline on each input type a loader would hand it (float32 [0, 1]
tensors, as butler; uint8 tensors; PIL images ending in a uint8 tensor); butler runs
`butler bench augment --threads 1` on float32 buffers. Prints one JSON line per measurement and a
summary table with the ratio butler / torchvision (higher is better for butler).

Equivalences (butler's constructors in worker/src/augment/mod.rs):
  weak   = RandomHorizontalFlip(0.5) + RandomCrop(H, padding=H/8, padding_mode="reflect")
  strong = weak + RandAugment(2, 10) + a Cutout hole of H/2 (torchvision: RandomErasing(p=1) of a
           fixed (H/2)^2 square; butler's hole is clipped at the border, so it is at most as large)
  simclr = RandomResizedCrop(H, (0.08, 1)) + RandomHorizontalFlip + RandomApply(ColorJitter(.4, .4,
           .4, .1), p=.8) + RandomGrayscale(.2)  (SimCLR's CIFAR recipe, no blur)
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2


def pipelines(h, w, ra_n, ra_m, kind):
    """The torchvision pipeline per name; `kind` is the input type (erasing needs a tensor)."""
    pad = -(-h // 8)  # ceil(h / 8): 4 for 32
    weak = [v2.RandomHorizontalFlip(0.5), v2.RandomCrop((h, w), padding=pad, padding_mode="reflect")]
    tail = [v2.PILToTensor()] if kind == "pil" else []
    side = min(h, w) // 2
    erase = v2.RandomErasing(p=1.0, scale=(side * side / (h * w),) * 2, ratio=(1.0, 1.0), value=0)
    return {
        "weak": v2.Compose(weak + tail),
        "strong": v2.Compose(weak + [v2.RandAugment(ra_n, ra_m)] + tail + [erase]),
        "simclr": v2.Compose(
            [
                v2.RandomResizedCrop((h, w), scale=(0.08, 1.0), antialias=True),
                v2.RandomHorizontalFlip(0.5),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(0.2),
            ]
            + tail
        ),
    }


def inputs(kind, n, c, h, w, rng):
    data = rng.random((n, c, h, w), dtype=np.float32)
    if kind == "float":
        return [torch.from_numpy(x.copy()) for x in data]
    u8 = (data * 255).round().astype(np.uint8)
    if kind == "uint8":
        return [torch.from_numpy(x.copy()) for x in u8]
    from PIL import Image

    return [Image.fromarray(x.transpose(1, 2, 0).squeeze()) for x in u8]


def time_torchvision(t, xs, samples):
    for i in range(min(200, samples)):  # warm-up
        t(xs[i % len(xs)])
    t0 = time.perf_counter()
    for i in range(samples):
        t(xs[i % len(xs)])
    return samples / (time.perf_counter() - t0)


def butler(exe, shape, pipeline, samples, threads, ra_n, ra_m):
    cmd = [exe, "bench", "augment", "--shape", ",".join(map(str, shape)), "--pipeline", pipeline,
           "--samples", str(samples), "--threads", str(threads), "--ra-n", str(ra_n), "--ra-m", str(ra_m)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--butler", default="target/release/butler")
    ap.add_argument("--shape", default="3,32,32")
    ap.add_argument("--samples", type=int, default=5000, help="torchvision samples per measurement")
    ap.add_argument("--butler-samples", type=int, default=50000)
    ap.add_argument("--pipelines", default="weak,strong,simclr")
    ap.add_argument("--kinds", default="float,uint8,pil", help="torchvision input types")
    ap.add_argument("--ra-n", type=int, default=2)
    ap.add_argument("--ra-m", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="also run butler with this many threads (0: skip)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    c, h, w = map(int, args.shape.split(","))
    rng = np.random.default_rng(0)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "shape": [c, h, w]}
    print(json.dumps({"env": meta}))
    rows = []
    for name in args.pipelines.split(","):
        b = butler(args.butler, (c, h, w), name, args.butler_samples, 1, args.ra_n, args.ra_m)
        print(json.dumps(b))
        if args.threads > 1:
            bt = butler(args.butler, (c, h, w), name, args.butler_samples, args.threads, args.ra_n, args.ra_m)
            print(json.dumps(bt))
            rows.append((name, f"butler f32 ({args.threads} threads)", bt["samples_per_s"], None))
        rows.append((name, "butler f32 (1 thread)", b["samples_per_s"], None))
        for kind in args.kinds.split(","):
            t = pipelines(h, w, args.ra_n, args.ra_m, kind)[name]
            xs = inputs(kind, 256, c, h, w, rng)
            sps = time_torchvision(t, xs, args.samples)
            rec = {"impl": "torchvision.v2", "pipeline": name, "input": kind, "samples": args.samples,
                   "threads": 1, "samples_per_s": sps, "butler_ratio": b["samples_per_s"] / sps}
            print(json.dumps(rec))
            rows.append((name, f"torchvision {kind} (1 thread)", sps, b["samples_per_s"] / sps))
    print()
    print(f"{'pipeline':8} {'implementation':32} {'samples/s':>12} {'butler/tv':>10}")
    for name, impl, sps, ratio in rows:
        r = f"{ratio:.1f}x" if ratio is not None else ""
        print(f"{name:8} {impl:32} {sps:12.0f} {r:>10}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
