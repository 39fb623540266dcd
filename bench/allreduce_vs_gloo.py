"""All-reduce bus bandwidth: butler's TCP ring vs torch.distributed's gloo, 2 local processes each.

usage: python bench/allreduce_vs_gloo.py [--butler target/release/butler] [--world 2] [--iters 10]
Prints one line per size with both bus bandwidths (busbw = algbw * 2(n-1)/n, GB/s = 1e9 B/s) and the ratio.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

SIZES_MIB = [1, 16, 64, 256]


def gloo_rank(rank, world, port, nbytes, iters, warmup, q):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    for _ in range(warmup):
        dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    secs = (time.perf_counter() - t0) / iters
    if rank == 0:
        q.put(secs)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo(world, nbytes, iters, warmup):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=gloo_rank, args=(r, world, port, nbytes, iters, warmup, q)) for r in range(world)]
    for p in procs:
        p.start()
    secs = q.get(timeout=600)
    for p in procs:
        p.join()
    return secs


def busbw(nbytes, world, secs):
    return nbytes / secs / 1e9 * 2 * (world - 1) / world


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--butler", default="target/release/butler")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    print(f"# world {args.world}, {os.cpu_count()} cores, loopback; busbw in GB/s (1e9 B/s)")
    print(f"{'size':>8} {'butler busbw':>13} {'gloo busbw':>11} {'ratio':>6}")
    for mib in SIZES_MIB:
        nbytes = mib << 20
        out = subprocess.run(
            [args.butler, "bench", "allreduce", "--world", str(args.world), "--bytes", str(nbytes),
             "--iters", str(args.iters), "--warmup", str(args.warmup)],
            check=True, capture_output=True, text=True,
        ).stdout
        ours = json.loads(out.strip().splitlines()[-1])
        theirs = busbw(nbytes, args.world, gloo(args.world, nbytes, args.iters, args.warmup))
        print(f"{mib:>5} MiB {ours['busbw_gbps']:>13.2f} {theirs:>11.2f} {ours['busbw_gbps'] / theirs:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
