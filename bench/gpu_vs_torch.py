"""butler on a GPU against plain PyTorch on the same GPU, in one run; prints one summary table.

Run by scripts/gpu-check.sh on the device machine (its own python3 and torch), or here with
`--device cpu` as a dry run of the training half (no NCCL, no GPU).

1. `butler doctor` and `butler doctor --check` (the CUDA ≡ CPU self-checks).
2. NCCL all-reduce (sum, f32, world 1) at 1-256 MiB: `butler bench nccl` vs torch.distributed's NCCL
   all_reduce, each op waited for (torch.cuda.synchronize) as butler's deadline poll does.
3. Training samples/s of MNIST-1D's ConvBase, fp32 and bf16: `butler bench train` vs the same model,
   batch, optimizer (Adam 1e-2) and host-to-device copy per step in a plain PyTorch loop that reads the
   loss each step (`loss.item()`, as butler's step does).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def butler_json(butler, *args):
    out = subprocess.run([butler, *args], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


class ConvBase(nn.Module):
    """MNIST-1D's ConvBase as butler builds it (worker/src/models.rs)."""

    def __init__(self, channels, length=40, classes=10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = length
        for k in (5, 3, 3):
            n = (n + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * n, classes)

    def forward(self, x):
        h = x.reshape(x.shape[0], 1, -1)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.linear(h.flatten(1))


def torch_train(device, precision, batch, channels, steps, warmup):
    torch.manual_seed(0)
    model = ConvBase(channels).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pool = [(torch.randn(batch, 40), torch.randint(0, 10, (batch,))) for _ in range(8)]
    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def step(i):
        x, y = pool[i % len(pool)]
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=False)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(warmup):
        step(i)
    if dev_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if dev_type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"step_seconds": seconds / steps, "samples_per_s": steps * batch / seconds}


def torch_nccl(sizes_mib, iters, warmup):
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    out = []
    for mib in sizes_mib:
        # At world 1 NCCL skips an in-place all_reduce, so butler times an out-of-place one (a device copy
        # through NCCL). torch.distributed has no out-of-place all_reduce; its all_gather_into_tensor is
        # the same NCCL out-of-place copy at world 1.
        t = torch.ones((mib << 20) // 4, device="cuda")
        o = torch.empty_like(t)
        for _ in range(warmup):
            dist.all_gather_into_tensor(o, t)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_gather_into_tensor(o, t)
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / iters
        out.append({"bytes": t.numel() * 4, "seconds": sec})
    dist.destroy_process_group()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--butler", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--channels", type=int, default=32)
    args = ap.parse_args()
    rows = []
    failed = False
    gpu = args.device.startswith("cuda")
    if gpu:
        subprocess.run([args.butler, "doctor"], check=False)
        r = subprocess.run([args.butler, "doctor", "--check", "--json"], capture_output=True, text=True)
        checks = json.loads(r.stdout)["checks"] if r.stdout.strip() else []
        for c in checks:
            rows.append((c["name"], c["outcome"].upper(), c["detail"]))
        if r.returncode != 0:
            failed = True
            print(r.stderr, file=sys.stderr)
        sizes = [1, 4, 16, 64, 256]
        ours = {d["bytes"]: d for d in butler_json(args.butler, "bench", "nccl", "--sizes-mib", ",".join(map(str, sizes)))}
        for t in torch_nccl(sizes, 20, 5):
            b = ours[t["bytes"]]
            rows.append((
                f"nccl world-1 op {t['bytes'] >> 20} MiB",
                f"{b['seconds'] / t['seconds']:.2f}x",
                f"butler {b['seconds'] * 1e6:.0f} us ({b['algbw_gbps']:.0f} GB/s), "
                f"torch.distributed {t['seconds'] * 1e6:.0f} us ({t['bytes'] / t['seconds'] / 1e9:.0f} GB/s); time ratio "
                "(world 1: both are an out-of-place device copy plus call overhead, not a cross-GPU reduction)",
            ))
    for precision in ("fp32", "bf16"):
        b = butler_json(args.butler, "bench", "train", "--device", "cuda" if gpu else "cpu",
                        "--precision", precision, "--batch", str(args.batch),
                        "--channels", str(args.channels), "--steps", str(args.steps))[0]
        t = torch_train(args.device, precision, args.batch, args.channels, args.steps, 30)
        ratio = b["step_seconds"] / t["step_seconds"]
        rows.append((
            f"train ConvBase {precision} b{args.batch}",
            f"{ratio:.2f}x",
            f"butler {b['samples_per_s']:.0f}/s, PyTorch {t['samples_per_s']:.0f}/s; step-time ratio (target <= 1.05)",
        ))
    print()
    print(f"{'check / benchmark':<44} {'result':<8} detail")
    for name, res, detail in rows:
        print(f"{name:<44} {res:<8} {detail}")
    print(f"\ntorch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if gpu else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
