"""NumPy side of the robust-rule comparison (agg_bench --robust-only).

Times, at the same shapes as `cargo run --release -p fleet-aggregation
--example agg_bench -- --robust-only` (64 updates of 1,000,000 values and
20 updates of the CNN's 1,663,370, float32, uniform in ±0.01), the way a
competent NumPy user would write each rule:

- median: np.median(U, axis=0) (introselect per column);
- trimmed mean (β = 0.1): np.partition at the two cut points, then the
  mean of the middle (selection, not a full sort), and the sort-based form
  for reference;
- Krum's pairwise squared distances: the Gram-matrix form
  |a|² + |b|² − 2a·b through BLAS (float32 and float64), and
  scipy-free direct differences row by row for reference.

Median of three runs each, in milliseconds. NumPy's BLAS uses every core.

    bench/.venv/bin/python bench/numpy_rules.py
"""

import time

import numpy as np


def median3(f):
    t = []
    for _ in range(3):
        s = time.perf_counter()
        f()
        t.append((time.perf_counter() - s) * 1e3)
    return sorted(t)[1]


def trimmed_partition(u, k):
    n = u.shape[0]
    p = np.partition(u, (k, n - k - 1), axis=0)
    return p[k : n - k].mean(axis=0, dtype=np.float64)


def trimmed_sort(u, k):
    n = u.shape[0]
    return np.sort(u, axis=0)[k : n - k].mean(axis=0, dtype=np.float64)


def gram(u, dtype):
    v = u.astype(dtype, copy=False)
    sq = np.einsum("ij,ij->i", v, v)
    return sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)


def direct(u):
    n = u.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        diff = u[i + 1 :] - u[i]
        d[i, i + 1 :] = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
    return d + d.T


def main():
    rng = np.random.default_rng(1)
    print(f"numpy {np.__version__}")
    print("| updates × values | rule | ms (median of 3) |")
    print("| --- | --- | --- |")
    for n, d in [(64, 1_000_000), (20, 1_663_370)]:
        u = rng.uniform(-0.01, 0.01, size=(n, d)).astype(np.float32)
        k = int(np.floor(0.1 * n))
        rows = [
            ("coordinate-wise median (np.median)", lambda: np.median(u, axis=0)),
            (f"trimmed mean (β = 0.1, {k} per side), np.partition", lambda: trimmed_partition(u, k)),
            ("trimmed mean, np.sort", lambda: trimmed_sort(u, k)),
            ("pairwise squared distances, Gram matrix float32", lambda: gram(u, np.float32)),
            ("pairwise squared distances, Gram matrix float64", lambda: gram(u, np.float64)),
            ("pairwise squared distances, direct differences", lambda: direct(u)),
        ]
        for name, f in rows:
            print(f"| {n} × {d} | {name} | {median3(f):.1f} |", flush=True)


if __name__ == "__main__":
    main()
