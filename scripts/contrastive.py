#!/usr/bin/env python3
"""The contrastive results grid behind the README table (run through scripts/contrastive.sh).

  contrastive.py configs OUTDIR   writes one job config per row from examples/mnist1d-{simclr,cpc}.toml
  contrastive.py table RUNDIR     prints the markdown table (mean ± std over the seeds found)

SimCLRv2 rows (from examples/mnist1d-40-simclrv2.toml: the 3500 training inputs of data/mnist1d-val500
as the unlabeled pool, the semi-supervised table's converged 6000-step fine-tuning recipe, then the
distill stage): simclrv2 (SimCLR → probe → fine-tune → distill), supervised-distill (no pretraining: the
augmented supervised baseline, then the same distillation from it), simclrv2-plain-kd (distillation on
the labeled batches only: unlabeled_weight = 0), simclrv2-100ep (100 pretraining epochs instead of 30). Their table has validation and test accuracy of the
fine-tune and distill stages.

Rows: supervised-only with 40 labels per class (without and with the 1-D augmentation), and SimCLR / CPC
pretraining on the 100k unlabeled pool at global batch 256 and 4096 (same pretraining epochs; LARS lr
scaled linearly with the batch, 0.3 · B / 256), each followed by a linear probe and fine-tuning with 40
labels per class. Every row fine-tunes with the same recipe ([optim]/[schedule]/[train] of the examples).
"""

import json
import re
import statistics
import sys
from pathlib import Path

ROWS = [
    # name, example, method, batch, finetune_augment, {key: value} overrides
    ("supervised", "simclr", "none", 256, False, {}),
    ("supervised-aug", "simclr", "none", 256, True, {}),
    ("simclr-256", "simclr", "simclr", 256, True, {}),
    ("simclr-4096", "simclr", "simclr", 4096, True, {}),
    ("cpc-256", "cpc", "cpc", 256, True, {}),
    ("cpc-4096", "cpc", "cpc", 4096, True, {}),
    # Diagnostics (why fine-tuning does not beat the augmented baseline):
    # 4x longer pretraining,
    ("simclr-256-16ep", "simclr", "simclr", 256, True, {"epochs": 16}),
    # fine-tuning from a random classifier instead of the probe,
    ("simclr-256-no-lpft", "simclr", "simclr", 256, True, {"finetune_from_probe": "true\nfinetune_from_probe = false"}),
    # and the same probe + LP-FT pipeline on an encoder left at its random init (LARS lr 1e-12, 1 epoch);
    # batch 4096 with the lr scaled by sqrt(B / 256) instead of linearly (1.2 instead of 4.8).
    ("random-encoder", "simclr", "simclr", 256, True, {"epochs": 1, "pretrain_lr": 1e-12}),
    ("simclr-4096-sqrt-lr", "simclr", "simclr", 4096, True, {"pretrain_lr": 1.2}),
]


V2_ROWS = [
    # name, method, {key: value} line replacements in [pretrain.distill] / [pretrain]; every row names
    # the pretraining length and the teacher's view, so rows do not depend on the example's choice.
    ("simclrv2", "simclr", {"epochs": "30", "teacher_view": '"same"'}),
    ("supervised-distill", "none", {"epochs": "30", "teacher_view": '"same"'}),
    ("simclrv2-plain-kd", "simclr",
     {"epochs": "30", "teacher_view": '"same"', "unlabeled_weight": "0.0", "unlabeled_ratio": "1"}),
    # Longer pretraining: 100 passes over the 3500 inputs (1400 steps) instead of 30 (420).
    ("simclrv2-100ep", "simclr", {"epochs": "100", "teacher_view": '"same"'}),
    # The teacher predicts on the clean input, the student on the strong view (Noisy Student's split).
    ("simclrv2-clean-teacher", "simclr", {"epochs": "30", "teacher_view": '"clean"'}),
    # Chosen on validation; the example's own recipe.
    ("simclrv2-100ep-clean-teacher", "simclr", {"epochs": "100", "teacher_view": '"clean"'}),
    ("supervised-distill-clean-teacher", "none", {"epochs": "30", "teacher_view": '"clean"'}),
]


def sub(text, key, value):
    """Replaces the first `key = ...` line (comment included) by `key = value`."""
    new, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    if n != 1:
        sys.exit(f"no line `{key} = ...` to replace")
    return new


def configs(outdir):
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, example, method, batch, aug, extra in ROWS:
        text = Path(f"examples/mnist1d-{example}.toml").read_text()
        text = sub(text, "name", f'"{name}"')
        text = sub(text, "method", f'"{method}"')
        text = sub(text, "finetune_augment", "true" if aug else "false")
        if method == "none":
            # No pretraining stage reads the pool.
            text = re.sub(r"^unlabeled_split = .*\n", "", text, flags=re.M)
        else:
            text = re.sub(r"^batch_size = 256 .*$", f"batch_size = {batch}", text, count=1, flags=re.M)
            # LARS lr 0.3 · B / 256; warmup ≈ 6 % of the steps.
            steps = 4 * (100_000 // batch + 1)
            text = re.sub(r"^lr = 0\.3 .*$", f"lr = {0.3 * batch / 256:g}", text, flags=re.M)
            text = sub(text, "warmup_steps", max(1, round(0.064 * steps)))
        for key, value in extra.items():
            if key == "finetune_from_probe":
                text = sub(text, "finetune_augment", value)
            elif key == "epochs":
                text = re.sub(r"^epochs = 4 .*$", f"epochs = {value}", text, count=1, flags=re.M)
            elif key == "pretrain_lr":
                head, tail = text.split("[pretrain.optim]")
                tail = re.sub(r"^lr = .*$", f"lr = {value}", tail, count=1, flags=re.M)
                text = head + "[pretrain.optim]" + tail
            else:
                sys.exit(f"unknown override {key}")
        (outdir / f"{name}.toml").write_text(text)
        print(outdir / f"{name}.toml")
    for name, method, extra in V2_ROWS:
        text = Path("examples/mnist1d-40-simclrv2.toml").read_text()
        text = sub(text, "name", f'"{name}"')
        text = sub(text, "method", f'"{method}"')
        for key, value in extra.items():
            text = sub(text, key, value)
        (outdir / f"{name}.toml").write_text(text)
        print(outdir / f"{name}.toml")


def ms(v):
    if not v:
        return "—"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.1f} ± {sd:.1f}"


def table(rundir):
    rundir = Path(rundir)
    print("| row | pretraining (global batch) | linear probe | fine-tune / supervised | seeds |")
    print("|---|---|---|---|---|")
    for name, _, method, batch, aug, _ in ROWS:
        runs = sorted(rundir.glob(f"{name}/seed-*/summary.json"))
        if not runs:
            continue
        probe, final = [], []
        for r in runs:
            s = json.loads(r.read_text())
            final.append(100 * s["test_accuracy"])
            for st in s.get("stages", []):
                if st["stage"] == "probe":
                    probe.append(100 * st["test_accuracy"])

        what = "none" if method == "none" else f"{method} ({batch})"
        label = name + (" (augmented)" if aug and method == "none" else "")
        print(f"| {label} | {what} | {ms(probe)} | {ms(final)} | {len(runs)} |")
    print()
    print("| row | linear probe (test) | fine-tune: val | fine-tune: test | distill: val | distill: test | seeds (test, distill) |")
    print("|---|---|---|---|---|---|---|")
    for name, method, _ in V2_ROWS:
        runs = sorted(rundir.glob(f"{name}/seed-*/summary.json"))
        if not runs:
            continue
        cols = {k: [] for k in ("probe", "ft_val", "ft_test", "d_val", "d_test")}
        for r in runs:
            s = json.loads(r.read_text())
            for st in s.get("stages", []):
                acc, val = st.get("test_accuracy"), st.get("val_accuracy")
                if st["stage"] == "probe":
                    cols["probe"].append(100 * acc)
                if st["stage"] == "finetune":
                    cols["ft_test"].append(100 * acc)
                    cols["ft_val"].append(100 * val)
                if st["stage"] == "distill":
                    cols["d_test"].append(100 * acc)
                    cols["d_val"].append(100 * val)
        per_seed = " ".join(f"{v:.1f}" for v in cols["d_test"])
        print(
            f"| {name} | {ms(cols['probe'])} | {ms(cols['ft_val'])} | {ms(cols['ft_test'])} "
            f"| {ms(cols['d_val'])} | {ms(cols['d_test'])} | {per_seed} |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("configs", "table"):
        sys.exit(__doc__)
    {"configs": configs, "table": table}[sys.argv[1]](sys.argv[2])
