"""Time per SimCLR step at a large global batch: butler (TCP ring, exact-gradient gather, LARS) vs PyTorch
DDP over gloo with a gradient-carrying all-gather, the same model, loss and optimizer, W local processes.

usage: python bench/simclr_vs_ddp.py [--butler target/debug/butler] [--world 2] [--batch 4096]
                                     [--iters 10] [--warmup 2] [--threads 1]
Prints one JSON line per implementation and the ratio (butler seconds / PyTorch seconds per step).

Both sides: MNIST-1D's ConvBase encoder (conv1d 1→25 k5 s2 p1, 25→25 k3 s2 p1 twice, ReLU), projection
125 → 128 → ReLU → 64, L2-normalised; NT-Xent with τ = 0.2 over the global batch (each anchor sees 2N − 2
negatives from all ranks); LARS (η = 0.01, momentum 0.9, weight decay 1e-6, biases excluded), lr
0.3·B/256; fixed random inputs (no loading, no augmentation); 1 intra-op thread per process by default.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank, world, port, batch, iters, warmup, threads, q):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class GatherWithGrad(torch.autograd.Function):
        """all_gather whose backward all-reduces the gathered matrix's gradient and returns this rank's
        slice, so every rank's embeddings get their gradient as negatives in every rank's anchors."""

        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts, 0)

        @staticmethod
        def backward(ctx, g):
            g = g.contiguous()
            dist.all_reduce(g)
            n = g.shape[0] // world
            return g[rank * n:(rank + 1) * n]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(1, 25, 5, stride=2, padding=1)
            self.c2 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.c3 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.p1 = nn.Linear(125, 128)
            self.p2 = nn.Linear(128, 64)

        def forward(self, x):
            h = x.reshape(-1, 1, 40)
            h = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(h))))))
            return F.normalize(self.p2(F.relu(self.p1(h.flatten(1)))), dim=1)

    class Lars(torch.optim.Optimizer):
        def __init__(self, params, lr, momentum, weight_decay, eta):
            super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    u = p.grad
                    if p.ndim > 1:
                        u = u + g["weight_decay"] * p
                        wn, un = p.norm(), u.norm()
                        trust = torch.where((wn > 0) & (un > 0), g["eta"] * wn / un, torch.ones_like(wn))
                        u = u * trust
                    st = self.state[p]
                    v = st.get("v")
                    st["v"] = u.clone() if v is None else v.mul_(g["momentum"]).add_(u)
                    p.sub_(g["lr"] * st["v"])

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net())
    opt = Lars(model.parameters(), lr=0.3 * batch / 256, momentum=0.9, weight_decay=1e-6, eta=0.01)
    torch.manual_seed(1 + rank)
    n = batch // world
    x1, x2 = torch.randn(n, 40), torch.randn(n, 40)
    tau, total = 0.2, 2 * batch
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])

    def step():
        z = torch.cat([model(x1), model(x2)], 0)  # local [2n, d]: view 1 then view 2
        allz = GatherWithGrad.apply(z)  # [W·2n, d], rank blocks
        off = rank * 2 * n
        logits = z @ allz.T / tau
        logits[torch.arange(2 * n), off + torch.arange(2 * n)] = float("-inf")
        # Mean over the global 2N anchors; DDP averages gradients over ranks, hence · world.
        loss = F.cross_entropy(logits, off + pos, reduction="sum") * world / total
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item() / world

    for _ in range(warmup):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    secs = (time.perf_counter() - t0) / iters
    if rank == 0:
        import resource
        q.put({"impl": "pytorch-ddp-gloo", "world": world, "global_batch": batch, "iters": iters,
               "threads": threads, "seconds_per_step": secs, "loss_rank0_part": loss,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    dist.destroy_process_group()


def ddp(args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ddp_rank, args=(r, args.world, port, args.batch, args.iters, args.warmup,
                                                 args.threads, q)) for r in range(args.world)]
    for p in procs:
        p.start()
    res = q.get(timeout=1800)
    for p in procs:
        p.join()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--butler", default="target/debug/butler")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = subprocess.run([args.butler, "bench", "simclr", "--world", str(args.world), "--batch", str(args.batch),
                          "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)],
                         check=True, capture_output=True, text=True).stdout
    b = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(b))
    t = ddp(args)
    print(json.dumps(t))
    print(f"SimCLR step, global batch {args.batch}, {args.world} workers: butler {b['seconds_per_step']:.3f} s, "
          f"PyTorch DDP {t['seconds_per_step']:.3f} s, ratio butler/PyTorch = "
          f"{b['seconds_per_step'] / t['seconds_per_step']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
