#!/usr/bin/env python3
"""Single-threaded PyTorch CPU local-training throughput benchmark.

Reference point for the Rust (burn) implementation of the same networks.
Trains on the real Fashion-MNIST training set (gzip IDX files), in file order,
with plain SGD (lr 0.05, no momentum, no weight decay) and mean cross-entropy.

Batch schedule (identical on the Rust side): step k (0-based, counting the
warm-up steps first) uses examples [k*B, (k+1)*B) of the training file; if a
run needs more than 60000 // B batches, it wraps around to batch 0.
Warm-up steps are not timed; the timed steps are the ones right after them.
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import time

# One thread everywhere: set before torch (and its OpenMP/MKL runtimes) load.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
LR = 0.05
NUM_CLASSES = 10

# Default (warm-up, timed) step counts per model; sized so the default run
# (2nn and cnn at batch 32 and 64) finishes in well under 3 minutes on a
# 2-core machine.
DEFAULT_STEPS = {
    "logreg": (50, 5000),
    "2nn": (50, 2000),
    "cnn": (10, 300),
}


# ---------------------------------------------------------------- data

def read_idx(path):
    """Parse a (gzip) IDX file into a numpy array (big-endian header)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX (0x08), got {dtype_code:#x}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data, got {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(data_dir):
    images = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(f"unexpected shapes: images {images.shape}, labels {labels.shape}")
    # (pixel / 255 - 0.2860) / 0.3530 as float32, as fleet-models normalises; shape [N, 1, 28, 28]
    x = torch.from_numpy((images.astype(np.float32) / np.float32(255.0) - np.float32(0.2860)) / np.float32(0.3530))
    x = x.unsqueeze(1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ---------------------------------------------------------------- models

class Flatten784(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 784)


def build_model(name):
    if name == "logreg":
        return nn.Sequential(Flatten784(), nn.Linear(784, NUM_CLASSES))
    if name == "2nn":
        return nn.Sequential(
            Flatten784(),
            nn.Linear(784, 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, NUM_CLASSES),
        )
    if name == "cnn":
        # McMahan et al. 2017 CNN; input [N, 1, 28, 28]
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),  # 64 * 7 * 7 = 3136
            nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, NUM_CLASSES),
        )
    raise ValueError(f"unknown model {name!r}")


# ---------------------------------------------------------------- benchmark

def bench_one(model_name, batch, x, y, warmup, steps):
    torch.manual_seed(0)
    model = build_model(model_name)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()  # mean reduction over the batch

    n_batches = x.shape[0] // batch
    if n_batches == 0:
        raise ValueError(f"batch {batch} larger than the data set ({x.shape[0]})")

    def step(k):
        i = k % n_batches
        xb = x[i * batch:(i + 1) * batch]
        yb = y[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    for k in range(warmup):
        step(k)

    times = []
    loss = None
    for k in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        loss = step(k)
        times.append(time.perf_counter() - t0)
    final_loss = float(loss.item()) if loss is not None else float("nan")

    total = sum(times)
    return {
        "framework": "pytorch",
        "version": torch.__version__,
        "model": model_name,
        "batch": batch,
        "threads": 1,
        "steps": steps,
        "examples_per_sec": (steps * batch / total) if total > 0 else float("nan"),
        "median_step_ms": statistics.median(times) * 1e3 if times else float("nan"),
    }, final_loss


def parse_list(s, conv=str):
    return [conv(v.strip()) for v in s.split(",") if v.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="2nn,cnn", help="comma list of 2nn, cnn, logreg (default: 2nn,cnn)")
    p.add_argument("--batches", default="32,64", help="comma list of batch sizes (default: 32,64)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per (model, batch); default per model: "
                        + ", ".join(f"{m}={s}" for m, (_, s) in DEFAULT_STEPS.items()))
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps; default per model: "
                        + ", ".join(f"{m}={w}" for m, (w, _) in DEFAULT_STEPS.items()))
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help=f"Fashion-MNIST IDX dir (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--json", default=None, metavar="PATH", help="write results as a JSON list to PATH")
    args = p.parse_args(argv)

    models = parse_list(args.models)
    for m in models:
        if m not in DEFAULT_STEPS:
            p.error(f"unknown model {m!r} (choose from {', '.join(DEFAULT_STEPS)})")
    batches = parse_list(args.batches, int)
    if any(b <= 0 for b in batches):
        p.error("batch sizes must be positive")
    if args.steps is not None and args.steps <= 0:
        p.error("--steps must be positive")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")

    x, y = load_fashion_mnist(args.data_dir)
    print(f"# torch {torch.__version__}, threads intra={torch.get_num_threads()} "
          f"interop={torch.get_num_interop_threads()}, data {tuple(x.shape)} from {args.data_dir}",
          file=sys.stderr)

    results = []
    for m in models:
        warmup_default, steps_default = DEFAULT_STEPS[m]
        warmup = warmup_default if args.warmup is None else args.warmup
        steps = steps_default if args.steps is None else args.steps
        for b in batches:
            t0 = time.perf_counter()
            res, final_loss = bench_one(m, b, x, y, warmup, steps)
            print(f"# {m} batch={b}: warmup={warmup} steps={steps} "
                  f"{res['examples_per_sec']:.1f} ex/s, median {res['median_step_ms']:.3f} ms, "
                  f"last loss {final_loss:.4f}, wall {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
            results.append(res)

    print("| framework | version | model | batch | threads | steps | examples/s | median step (ms) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['framework']} | {r['version']} | {r['model']} | {r['batch']} | {r['threads']} | "
              f"{r['steps']} | {r['examples_per_sec']:.1f} | {r['median_step_ms']:.3f} |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
