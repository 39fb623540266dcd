"""The semi-supervised table behind the README: MNIST-1D with 40 labels per class (unlabeled = the 4000
training inputs, or a 100,000-sample generated pool), sklearn digits with 10 labels per class, and domain
adaptation to the shifted MNIST-1D target; supervised-only without and with augmentation (the honest
baseline), UDA, FixMatch and pseudo-label rounds (R = 3); 2 workers, mean ± std over seeds. Run through
scripts/ssl.sh (which installs, prepares data and builds first).

usage: python scripts/ssl.py BUTLER_BINARY [--seeds 3] [--workers 2] [--out runs/ssl] [--only NAME]
"""
import argparse
import json
import os
import statistics
import subprocess

MNIST = "examples/mnist1d-40-"
METHODS = [
    ("supervised, no augmentation", "labels"),
    ("supervised + strong augmentation (honest baseline)", "augmented"),
    ("UDA", "uda"),
    ("FixMatch", "fixmatch"),
    ("pseudo-label rounds (R = 3, noisy student)", "pseudo-label"),
]


def mnist(method, **swap):
    text = open(f"{MNIST}{method}.toml").read()
    for old, new in swap.items():
        text = text.replace(old, new)
    return text


POOL = {'manifest = "data/mnist1d-val500"': 'manifest = "data/mnist1d-val500-pool"', 'unlabeled_split = "train"': 'unlabeled_split = "unlabeled"'}
# Domain adaptation: labeled source (40 per class), unlabeled target train split, evaluated on target test.
SHIFT = {
    'manifest = "data/mnist1d-val500"': 'manifest = "data/mnist1d-shift-val500"',
    'unlabeled_split = "train"': 'unlabeled_split = "target_train"',
    "labels_per_class = 40": 'labels_per_class = 40\ntest_split = "target_test"',
}


def digits(method):
    """Digits with 10 labels per class: the MNIST-1D recipe's methods on the digits MLP."""
    text = mnist(method, **{'manifest = "data/mnist1d-val500"': 'manifest = "data/digits-val200"', "labels_per_class = 40": "labels_per_class = 10"})
    text = text.replace('kind = "conv_base"', 'kind = "mlp"\nhidden = [256]')
    text = text.replace("steps = 6000", "steps = 3000").replace("batch_size = 64", "batch_size = 32")
    return text


TABLES = {
    "mnist1d-40": [(n, mnist(m)) for n, m in METHODS],
    "mnist1d-40-pool100k": [(n, mnist(m, **POOL)) for n, m in METHODS[2:]],
    "digits-10": [(n, digits(m)) for n, m in METHODS],
    "mnist1d-shift": [(n.replace("supervised", "source-only"), mnist(m, **SHIFT)) for n, m in METHODS],
}


def run(butler, text, out, seed, workers):
    summary = os.path.join(out, "summary.json")
    if not os.path.exists(summary):
        os.makedirs(out, exist_ok=True)
        cfg = os.path.join(out, "config.toml")
        with open(cfg, "w") as f:
            f.write(text)
        subprocess.run([butler, "run", cfg, "--workers", str(workers), "--seed", str(seed), "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
    with open(summary) as f:
        d = json.load(f)
    return d.get("val_accuracy") or float("nan"), d["test_accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("butler")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/ssl")
    ap.add_argument("--only", default=None, help="run one table")
    args = ap.parse_args()
    for table, rows in TABLES.items():
        if args.only and table != args.only:
            continue
        print(f"\n{table} ({args.seeds} seeds, {args.workers} workers)\n")
        print("| method | validation (%) | test, per seed | test (%) mean ± std |\n|---|---|---|---|")
        for name, text in rows:
            slug = name.split(" (")[0].replace(" ", "-").replace(",", "").replace("+", "plus").lower()
            res = [run(args.butler, text, f"{args.out}/{table}/{slug}/seed-{s}", s, args.workers)
                   for s in range(args.seeds)]
            val = [100 * v for v, _ in res]
            accs = [100 * t for _, t in res]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {name} | {statistics.mean(val):.1f} | {' '.join(f'{a:.1f}' for a in accs)} | "
                  f"{statistics.mean(accs):.1f} ± {sd:.1f} |", flush=True)


if __name__ == "__main__":
    main()
