"""Reference values for the Rust accountant tests (`accountant/tests.rs`).

Produced with (PyPI, installed with `pip install --target DIR`):
  * opacus 1.6.0         -- only `opacus/accountants/analysis/rdp.py` is loaded
                            (by file path, so torch is not needed)
  * dp-accounting 0.6.0  -- `dp_accounting.pld.PLDAccountant`, default settings
                            (ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
  * numpy 2.4.6, scipy 1.17.1, attrs 26.1.0, mpmath 1.4.1, absl-py 2.5.1
  * Python 3.11.7

Run:  PYTHONPATH=DIR python3 reference_values.py > reference_rows.txt
and paste the printed rows into the tables of `tests.rs` (RDP, PLD, mixed,
per-order) and `special.rs` (log erfc, normal quantile).
"""

import importlib.util
import math
import sys
import time

import numpy as np
from scipy import special

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant


def load_opacus_rdp(pkg_dir):
    spec = importlib.util.spec_from_file_location(
        "opacus_rdp", f"{pkg_dir}/opacus/accountants/analysis/rdp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def find_pkg_dir():
    # find_spec locates the top-level package without importing it
    # (opacus/__init__.py imports torch, which is not needed here).
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("opacus not found on PYTHONPATH")
    return list(spec.submodule_search_locations)[0].rsplit("/", 1)[0]


rdp = load_opacus_rdp(find_pkg_dir())

# Opacus RDPAccountant.DEFAULT_ALPHAS
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# (q, sigma, T, delta)
CASES = [
    (1.0, 1.0, 1, 1e-5),
    (1.0, 5.0, 100, 1e-5),
    (1.0, 2.0, 10, 1e-6),
    (0.001, 1.0, 10000, 1e-5),
    (0.001, 3.0, 1, 1e-5),
    (0.01, 1.0, 1000, 1e-5),
    (0.01, 1.0, 10000, 1e-5),
    (0.01, 0.7, 100, 1e-5),
    (0.05, 0.8, 500, 1e-5),
    (0.1, 2.0, 100, 1e-6),
    (0.1, 5.0, 1000, 1e-5),
    (0.5, 2.0, 10, 1e-3),
    # TF-Privacy MNIST tutorial: batch 256 of 60000, sigma 1.1, 60 epochs
    (256 / 60000, 1.1, int(math.ceil(60 * 60000 / 256)), 1e-5),
]

# heterogeneous composition: list of (q, sigma, T), delta
MIXED = [
    ([(0.01, 1.0, 500), (0.02, 1.5, 300)], 1e-5),
    ([(1.0, 4.0, 20), (0.05, 1.2, 200), (0.01, 0.9, 1000)], 1e-6),
]


def opacus_eps(groups, delta):
    total = np.zeros(len(ALPHAS))
    for q, s, t in groups:
        total += rdp.compute_rdp(q=q, noise_multiplier=s, steps=t, orders=ALPHAS)
    eps, order = rdp.get_privacy_spent(orders=ALPHAS, rdp=total, delta=delta)
    return float(eps), float(order)


def pld_eps(groups, delta):
    acc = pld_privacy_accountant.PLDAccountant()
    for q, s, t in groups:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s))
        acc.compose(event, t)
    return float(acc.get_epsilon(delta))


def main():
    print(f"// opacus rdp.py + dp-accounting, numpy {np.__version__}")
    print("// (q, sigma, T, delta, eps_rdp_opacus, order_opacus, eps_pld_dp_accounting)")
    for q, s, t, d in CASES:
        e, o = opacus_eps([(q, s, t)], d)
        t0 = time.time()
        p = pld_eps([(q, s, t)], d)
        print(f"    ({q!r}, {s!r}, {t}, {d!r}, {e!r}, {o!r}, {p!r}), "
              f"// pld {time.time() - t0:.1f}s", flush=True)
    print("// mixed: (groups, delta, eps_rdp_opacus, eps_pld_dp_accounting)")
    for groups, d in MIXED:
        e, _ = opacus_eps(groups, d)
        p = pld_eps(groups, d)
        print(f"    (&{groups!r}, {d!r}, {e!r}, {p!r}),")
    print("// per-order RDP of one round: (q, sigma, order, rdp)")
    for q, s in [(0.01, 1.0), (0.1, 0.7), (0.5, 2.0), (0.001, 5.0)]:
        for a in [1.1, 1.5, 2.0, 2.5, 3.7, 10.9, 12.0, 63.0]:
            v = rdp.compute_rdp(q=q, noise_multiplier=s, steps=1, orders=a)
            print(f"    ({q!r}, {s!r}, {a!r}, {float(v)!r}),")
    print("// log(erfc(x)) via scipy: (x, value)")
    for x in [-3.0, -0.5, 0.0, 0.3, 0.9, 1.2, 2.0, 5.0, 10.0, 27.0, 40.0, 1e3]:
        print(f"    ({x!r}, {float(math.log(2) + special.log_ndtr(-x * 2**0.5))!r}),")
    print("// standard normal ppf(0.5*exp(-50))")
    from scipy import stats
    print(f"    {float(stats.norm.ppf(0.5 * math.exp(-50)))!r}")


if __name__ == "__main__":
    main()
