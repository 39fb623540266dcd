#!/usr/bin/env python3
"""Runs `butler bench checkpoint` for each model and times plain PyTorch checkpointing of the same state:
the tensors of butler's file (weights, EMA, Adam moments) as one dict, `torch.save` to a file + fsync,
and `torch.load`. Prints one table: size, write and load times, and butler / torch ratios.

Run through bench/checkpoint.sh (python -P: scripts/ssl.py must not shadow the stdlib's ssl)."""

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from safetensors.torch import load_file

MODELS = [
    ("conv_base", ["--model", "conv_base", "--channels", "25"]),
    ("mlp 4096x4096", ["--model", "mlp", "--hidden", "4096,4096"]),
]


def torch_times(path, repeat):
    state = load_file(path)
    out = path + ".pt"
    writes, loads = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with open(out, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        writes.append(time.perf_counter() - t0)
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.load(out, weights_only=True)
        loads.append(time.perf_counter() - t0)
    return os.path.getsize(out), statistics.median(writes), statistics.median(loads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--butler", default="target/debug/butler")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, args in MODELS:
        cmd = [a.butler, "bench", "checkpoint", *args, "--repeat", str(a.repeat),
               "--steps", str(a.steps), "--every", str(a.every)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        b = json.loads(out.strip().splitlines()[-1])
        tb, tw, tl = torch_times(b["file"], a.repeat)
        rows.append((name, b, tb, tw, tl))
    print(f"| model | parameters | butler file | write (butler / torch.save) | load (butler / torch.load) "
          f"| step | overhead, commit every {a.every} steps |")
    print("|---|---|---|---|---|---|---|")
    for name, b, tb, tw, tl in rows:
        print(f"| {name} | {b['parameters']:,} | {b['bytes'] / 2**20:.2f} MiB (torch {tb / 2**20:.2f}) "
              f"| {b['write_seconds'] * 1e3:.1f} / {tw * 1e3:.1f} ms ({b['write_seconds'] / tw:.2f}×) "
              f"| {b['load_seconds'] * 1e3:.1f} / {tl * 1e3:.1f} ms ({b['load_seconds'] / tl:.2f}×) "
              f"| {b['step_seconds'] * 1e3:.2f} ms | {b['overhead_pct']:.1f} % |")


if __name__ == "__main__":
    main()
