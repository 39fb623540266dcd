"""Generates a dataset offline with its reference package and writes the raw arrays to one safetensors
file; `butler data prepare` turns that into butler shards and a manifest. Run by butler with the project
venv's python; never downloads anything.

usage: datagen.py {mnist1d,mnist1d-shift,digits} OUT_FILE
       datagen.py mnist1d-pool OUT_FILE NUM_SAMPLES SEED   (one chunk of an unlabeled pool: x only)
"""
import json
import sys

import numpy as np
from safetensors.numpy import save_file


def mnist1d():
    # The package's offline generator with its default arguments (4000 train / 1000 test, length 40).
    # make_dataset() generates; only get_dataset() would download the pickled copy.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    d = make_dataset(args)
    source = {k: str(v) for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
    source["generator"] = "mnist1d.data.make_dataset"
    return d["x"], d["y"], d["x_test"], d["y_test"], [str(i) for i in range(10)], source


# The target domain of `mnist1d-shift`: the same generator and templates under shifted parameters —
# 1.6x the shear range, 1.5x the amplitude-scale range, 1.6x the correlated noise, 2.5x the i.i.d. noise,
# a wider translation range — and another seed. Source = the standard train/test.
SHIFT = {"shear_scale": 1.2, "scale_coeff": 0.6, "corr_noise_scale": 0.4, "iid_noise_scale": 0.05, "max_translation": 56, "seed": 4242}


def mnist1d_shift():
    from mnist1d.data import get_dataset_args, make_dataset

    xtr, ytr, xte, yte, classes, source = mnist1d()
    args = get_dataset_args()
    for k, v in SHIFT.items():
        setattr(args, k, v)
    t = make_dataset(args)
    source = {f"source.{k}": v for k, v in source.items()}
    source.update({f"target.{k}": str(v) for k, v in vars(args).items() if k != "url"})
    source["generator"] = "mnist1d.data.make_dataset (source: default arguments; target: shifted, see target.*)"
    splits = {"train": (xtr, ytr), "test": (xte, yte), "target_train": (t["x"], t["y"]), "target_test": (t["x_test"], t["y_test"])}
    return splits, classes, source


def mnist1d_pool(num_samples, seed):
    # More samples from the same generator for an unlabeled split: default arguments except the count
    # and the seed (butler passes seeds that differ from train/test's 42, one per chunk). make_dataset
    # makes num_samples // 10 per class, shuffles, standardises the chunk by its own mean/std and
    # splits 80/20; the pool is both parts, cut to the count asked for. Labels are discarded.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = -(-num_samples // 10) * 10
    args.seed = seed
    d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]])[:num_samples]
    assert len(x) == num_samples, (len(x), num_samples)
    return x


def digits():
    # scikit-learn's bundled 8x8 digits (1797 samples, values 0..16), scaled to [0, 1] and split 80/20
    # stratified with a fixed seed, since the set ships without a test split.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    source = {"generator": "sklearn.datasets.load_digits", "split": "train_test_split(test_size=0.2, stratify=y, random_state=0)", "scale": "x/16"}
    return xtr, ytr, xte, yte, [str(i) for i in range(10)], source


def main():
    name, out = sys.argv[1], sys.argv[2]
    if name == "mnist1d-pool":
        n, seed = int(sys.argv[3]), int(sys.argv[4])
        x = np.ascontiguousarray(mnist1d_pool(n, seed), dtype=np.float32)
        save_file({"x": x}, out, metadata={"seed": str(seed)})
        return
    if name == "mnist1d-shift":
        splits, classes, source = mnist1d_shift()
    else:
        xtr, ytr, xte, yte, classes, source = {"mnist1d": mnist1d, "digits": digits}[name]()
        splits = {"train": (xtr, ytr), "test": (xte, yte)}
    arrays = {}
    for split, (x, y) in splits.items():
        arrays[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        arrays[f"y_{split}"] = np.ascontiguousarray(y, dtype=np.int64)
    meta = {"classes": json.dumps(classes), "source": json.dumps(source), "splits": json.dumps(list(splits))}
    save_file(arrays, out, metadata=meta)


if __name__ == "__main__":
    main()
