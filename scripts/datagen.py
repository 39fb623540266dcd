"""Generates a dataset offline with its reference package and writes the raw arrays to one safetensors
file; `butler data prepare` turns that into butler shards and a manifest. Run by butler with the project
venv's python; never downloads anything.

usage: datagen.py {mnist1d,digits} OUT_FILE
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
    xtr, ytr, xte, yte, classes, source = {"mnist1d": mnist1d, "digits": digits}[name]()
    arrays = {
        "x_train": np.ascontiguousarray(xtr, dtype=np.float32),
        "y_train": np.ascontiguousarray(ytr, dtype=np.int64),
        "x_test": np.ascontiguousarray(xte, dtype=np.float32),
        "y_test": np.ascontiguousarray(yte, dtype=np.int64),
    }
    save_file(arrays, out, metadata={"classes": json.dumps(classes), "source": json.dumps(source)})


if __name__ == "__main__":
    main()
