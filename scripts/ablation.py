"""The regularizer ablation behind the README's table: few-label MNIST-1D and sklearn digits, baseline vs
each data regularizer vs knowledge distillation from a teacher trained on all labels, 2 workers, mean ±
std over seeds. Run through scripts/ablation.sh (which installs, prepares data and builds first).

usage: python scripts/ablation.py BUTLER_BINARY [--seeds 3] [--workers 2] [--out runs/ablation]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

BASES = {
    # 100 labels per class of MNIST-1D's 4000 training samples (1000 labeled), ConvBase.
    "mnist1d-100": {
        "config": "examples/mnist1d-100-labels.toml",
        "teacher": "examples/mnist1d-supervised.toml",
        "cutout": "holes = 1\nsize = 8\n",
        "layers": "[0, 1, 2, 3]",
    },
    # 20 labels per class of digits' 1437 training images (200 labeled), MLP.
    "digits-20": {
        "config": "examples/digits-20-labels.toml",
        "teacher": "examples/digits-supervised.toml",
        "cutout": "holes = 1\nsize = 4\n",
        "layers": "[0, 1]",
    },
}

# Each row: (name, TOML appended to the base config). "{teacher}" and "{cutout}" are filled per dataset.
ROWS = [
    ("baseline", ""),
    ("label smoothing ε=0.1", "@ls"),
    ("Mixup α=0.4", "[regularize.mix]\nmixup_alpha = 0.4\n"),
    ("CutMix α=1", "[regularize.mix]\ncutmix_alpha = 1.0\n"),
    ("Cutout", "[regularize.cutout]\n{cutout}"),
    ("Manifold Mixup α=2 (input + every block)", "[regularize.manifold_mixup]\nalpha = 2.0\nlayers = {layers}\n"),
    ("CutMix + label smoothing", "@ls[regularize.mix]\ncutmix_alpha = 1.0\n"),
    ("KD (T=4, α=0.5) from all-label teacher", "[regularize.distill]\nteacher = \"{teacher}\"\nalpha = 0.5\ntemperature = 4.0\n"),
    ("KD + distillation on all train inputs as unlabeled (μ=4)", "@unl[regularize.distill]\nteacher = \"{teacher}\"\nalpha = 0.5\ntemperature = 4.0\n"),
]


def run(butler, config, out, seed, workers):
    if not os.path.exists(os.path.join(out, "summary.json")):
        subprocess.run([butler, "run", config, "--workers", str(workers), "--seed", str(seed), "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["test_accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("butler")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args()
    lines = []
    for dataset, b in BASES.items():
        base = open(b["config"]).read()
        cols = []
        for seed in range(args.seeds):
            t_out = f"{args.out}/{dataset}/teacher/seed-{seed}"
            run(args.butler, b["teacher"], t_out, seed, args.workers)
        for row, overlay in ROWS:
            accs = []
            for seed in range(args.seeds):
                teacher = os.path.abspath(f"{args.out}/{dataset}/teacher/seed-{seed}/checkpoints/final.safetensors")
                text, extra = base, overlay
                if extra.startswith("@ls"):
                    text = text.replace("[train]\n", "[train]\nlabel_smoothing = 0.1\n", 1)
                    extra = extra[3:]
                if extra.startswith("@unl"):
                    # The train split's inputs, labels ignored, streamed as the unlabeled data.
                    text = text.replace("[model]\n", "unlabeled_split = \"train\"\nunlabeled_ratio = 4\n\n[model]\n", 1)
                    extra = extra[4:]
                text += "\n" + extra.format(teacher=teacher, cutout=b["cutout"], layers=b["layers"])
                slug = row.split(" ")[0].lower() + ("-ls" if "smoothing" in row and "+" in row else "") + ("-unlabeled" if "unlabeled" in row else "")
                out = f"{args.out}/{dataset}/{slug}/seed-{seed}"
                os.makedirs(out, exist_ok=True)
                cfg = f"{out}/job-input.toml"
                with open(cfg, "w") as f:
                    f.write(text)
                accs.append(run(args.butler, cfg, out, seed, args.workers))
            cols.append((row, accs))
            print(f"{dataset:12} {row:42} " + " ".join(f"{100 * a:.1f}" for a in accs), flush=True)
        lines.append((dataset, cols))
    print()
    names = [d for d, _ in lines]
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, (row, _) in enumerate(lines[0][1]):
        cells = []
        for _, cols in lines:
            accs = cols[i][1]
            cells.append(f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
