"""Writes the TensorBoard fixture `coordinator/tests/fixtures/torch.tfevents`: scalars written by torch's
own `SummaryWriter`, so `cargo test` checks butler's event-file reader (and through it the format butler
writes) against the reference writer. Needs the `tensorboard` package next to torch:
`.venv/bin/pip install tensorboard==2.20.0 && .venv/bin/python -P scripts/fixtures_tb.py`."""
import glob
import os
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

out = os.path.join(os.path.dirname(__file__), "..", "coordinator", "tests", "fixtures", "torch.tfevents")
with tempfile.TemporaryDirectory() as d:
    w = SummaryWriter(log_dir=d)
    for step in range(1, 21):
        w.add_scalar("train/loss", 1.0 / step, step * 10)
        w.add_scalar("train/lr", 0.01 * step, step * 10)
    for epoch in range(3):
        w.add_scalar("epoch/test_accuracy", 0.5 + 0.1 * epoch, epoch)
    w.close()
    (src,) = glob.glob(os.path.join(d, "events.out.tfevents.*"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.copy(src, out)
print("wrote", os.path.normpath(out))
