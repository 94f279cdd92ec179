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

The sections after the normal quantile (full-participation, q = 1, rounds:
k-fold compositions, heterogeneous compositions and the noise multiplier for
a target epsilon) were added later and produced with the same versions as
above -- opacus 1.6.0, dp-accounting 0.6.0, numpy 2.4.6, scipy 1.17.1,
attrs 26.1.0, mpmath 1.4.1, absl-py 2.5.1, Python 3.11.7 -- freshly installed
with `pip install --target`, which reproduces every value of the earlier
sections exactly. They fill Q1_COMPOSED, Q1_MIXED and Q1_INVERSE in
`tests.rs`.
Their `eps_exact` column is the exact epsilon of the Gaussian mechanism
(Balle & Wang 2018: k rounds at sigma_i compose to one Gaussian with
1/sigma_eff^2 = sum k_i / sigma_i^2), solved with scipy; both accountants are
upper bounds on it. dp-accounting has no noise-multiplier search, so
`sigma_for_epsilon` bisects on its epsilon (and on Opacus's, for RDP).
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
    q1_sections()


# Full participation (q = 1): every round is one Gaussian step, and a device
# that took part in k rounds has the k-fold composition.
# (sigma, k, delta)
Q1_CASES = [
    (0.5, 2, 1e-5),
    (0.5, 16, 1e-6),
    (0.8, 4, 1e-3),
    (0.8, 25, 1e-5),
    (0.8, 50, 1e-6),
    (1.1, 8, 1e-5),
    (1.1, 50, 1e-3),
    (1.5, 2, 1e-6),
    (1.5, 16, 1e-5),
    (1.5, 25, 1e-3),
    (3.0, 4, 1e-5),
    (3.0, 50, 1e-6),
]

# heterogeneous q = 1 compositions: list of (q, sigma, k), delta
Q1_MIXED = [
    ([(1.0, 1.1, 10), (1.0, 0.9, 5)], 1e-5),
    ([(1.0, 2.0, 3), (1.0, 1.2, 7), (1.0, 0.8, 2)], 1e-5),
]

# noise multiplier for k q = 1 rounds to reach (epsilon, delta)
Q1_INVERSE = [
    (8.0, 1e-5, 10),
    (4.0, 1e-5, 4),
    (1.0, 1e-6, 1),
]


def gaussian_exact_eps(groups, delta):
    """Exact epsilon of composed q = 1 Gaussian steps at delta."""
    from scipy import optimize
    assert all(q == 1.0 for q, _, _ in groups)
    s = 1.0 / math.sqrt(sum(t / (sig * sig) for _, sig, t in groups))

    def delta_of(eps):
        # Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), in logs.
        a = special.log_ndtr(0.5 / s - eps * s)
        b = eps + special.log_ndtr(-0.5 / s - eps * s)
        return math.exp(a) * -math.expm1(b - a)

    if delta_of(0.0) <= delta:
        return 0.0
    hi = 1.0
    while delta_of(hi) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda e: delta_of(e) - delta, 0.0, hi,
                                 xtol=1e-15, rtol=1e-15, maxiter=500))


def sigma_for_epsilon(eps_of_sigma, target, rel=1e-9):
    """Bisection (geometric) for the sigma where eps_of_sigma crosses target.

    Returns (sigma_lo, sigma_hi) with eps(sigma_lo) > target >= eps(sigma_hi)
    and sigma_hi / sigma_lo - 1 <= rel.
    """
    lo, hi = 1.0, 1.0
    while eps_of_sigma(hi) > target:
        hi *= 2.0
    lo = hi / 2.0
    while eps_of_sigma(lo) <= target:
        hi, lo = lo, lo / 2.0
    while hi / lo - 1.0 > rel:
        mid = math.sqrt(lo * hi)
        if eps_of_sigma(mid) <= target:
            hi = mid
        else:
            lo = mid
    return lo, hi


def q1_sections():
    print("// q = 1 k-fold: (sigma, k, delta, eps_rdp_opacus, order_opacus, "
          "eps_pld_dp_accounting, eps_exact)")
    for s, k, d in Q1_CASES:
        g = [(1.0, s, k)]
        e, o = opacus_eps(g, d)
        t0 = time.time()
        p = pld_eps(g, d)
        # A plain GaussianDpEvent composed k times is discretised once at
        # sigma / sqrt(k) instead of being discretised per step and
        # self-composed (the route of the PoissonSampledDpEvent above and of
        # the Rust accountant); the two differ in the last ~8 digits.
        acc = pld_privacy_accountant.PLDAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(s), k)
        direct = float(acc.get_epsilon(d))
        assert abs(direct - p) <= 1e-6 * p, (s, k, d, direct, p)
        x = gaussian_exact_eps(g, d)
        print(f"    ({s!r}, {k}, {d!r}, {e!r}, {o!r}, {p!r}, {x!r}), "
              f"// pld {time.time() - t0:.1f}s; GaussianDpEvent pld {direct!r}",
              flush=True)
    print("// q = 1 mixed: (groups, delta, eps_rdp_opacus, eps_pld_dp_accounting, "
          "eps_exact)")
    for groups, d in Q1_MIXED:
        e, _ = opacus_eps(groups, d)
        p = pld_eps(groups, d)
        x = gaussian_exact_eps(groups, d)
        print(f"    (&{groups!r}, {d!r}, {e!r}, {p!r}, {x!r}),", flush=True)
    print("// q = 1 noise multiplier for (eps, delta, k): (eps, delta, k, "
          "sigma_pld_dp_accounting, sigma_rdp_opacus, sigma_exact)")
    print("// each sigma is the upper end of a bisection bracket of relative "
          "width <= 1e-9 (eps(sigma) <= target)")
    for target, d, k in Q1_INVERSE:
        t0 = time.time()
        p_lo, p_hi = sigma_for_epsilon(lambda s: pld_eps([(1.0, s, k)], d), target)
        r_lo, r_hi = sigma_for_epsilon(
            lambda s: opacus_eps([(1.0, s, k)], d)[0], target)
        x_lo, x_hi = sigma_for_epsilon(
            lambda s: gaussian_exact_eps([(1.0, s, k)], d), target)
        print(f"    ({target!r}, {d!r}, {k}, {p_hi!r}, {r_hi!r}, {x_hi!r}), "
              f"// pld eps at sigma: {pld_eps([(1.0, p_hi, k)], d)!r}, "
              f"{time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
