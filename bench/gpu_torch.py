"""The robust rules of agg_bench's GPU table, in PyTorch on the GPU, as a peer.

Times median (torch.median over dim 0, the lower middle value for an even
count: same cost, not the same definition), the sort-based trimmed mean and the
pairwise squared distances (Krum's input: torch.cdist in float64, which
takes a matrix product at these sizes) for N updates of P parameters, both "host in, host
out" (as agg_bench measures the Rust backend: copy the updates from host
memory, compute, copy the result back) and on-device only. Prints a markdown
table.

    python bench/gpu_torch.py --params 25000000 --updates 64
"""

import argparse
import time

import torch


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def trimmed_mean(x, trim):
    s, _ = torch.sort(x, dim=0)
    return s[trim : x.shape[0] - trim].double().mean(dim=0).float()


def distances(x):
    # float64, as the Rust backends accumulate; chunks of coordinates keep
    # the float64 copy small.
    n, p = x.shape
    d = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, (1 << 28) // (8 * n))
    for c in range(0, p, step):
        d += torch.cdist(x[:, c : c + step].double(), x[:, c : c + step].double()) ** 2
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=25_000_000, help="parameters per update")
    ap.add_argument("--updates", type=int, default=64, help="number of updates")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipping: torch sees no CUDA device")
        return
    n, p = args.updates, args.params
    trim = n // 10
    gen = torch.Generator().manual_seed(8)
    # Pageable host memory, as the Rust backend receives its updates.
    host = torch.rand(n, p, generator=gen) * 0.02 - 0.01
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}\n")
    print(f"| rule ({n} updates × {p} parameters) | host in, host out s | on device s |")
    print("| --- | --- | --- |")
    rules = [
        ("median", lambda x: torch.median(x, dim=0).values),
        (f"trimmed mean (trim {trim} per side)", lambda x: trimmed_mean(x, trim)),
        ("Krum: pairwise squared distances", distances),
    ]
    # Warm-up (kernel loading, allocator).
    small = host[:, :1024].to(dev)
    for _, f in rules:
        f(small)
    for name, f in rules:
        full, _ = timed(lambda: f(host.to(dev)).cpu())
        x = host.to(dev)
        on_dev, _ = timed(lambda: f(x))
        del x
        torch.cuda.empty_cache()
        print(f"| {name} | {full:.3f} | {on_dev:.3f} |")


if __name__ == "__main__":
    main()
