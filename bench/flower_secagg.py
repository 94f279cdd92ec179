"""Flower's SecAgg+ against Flower's plain FedAvg round, same clients and vector.

The peer side of "Secure aggregation: added round time" in docs/benchmarks.md.
Each of N simulated clients returns the same-sized float32 vector (a fixed
random vector per client, inside Flower's default clipping range) with no
training, so a round is the exchange and the aggregation only. The script
runs R rounds of plain FedAvg (Flower's default fit workflow) and then R
rounds of `SecAggPlusWorkflow` (Flower's legacy-API SecAgg+: num_shares and
reconstruction_threshold as given, its default clipping range 8,
quantisation range 2^22 and modulus 2^32, timeout 60 s), each in its own
`run_simulation` with the Ray backend and one CPU per client actor, and
prints the time of each round: from the strategy's `configure_fit` to the
end of its `aggregate_fit` (SecAgg+ calls both, around its four stages).

    python3 -m venv .venv && .venv/bin/pip install -r bench/requirements-flower.txt
    .venv/bin/python bench/flower_secagg.py --clients 100 --dim 199210 --rounds 3

The default `--dim` is the 2NN's parameter count; `--shares` and
`--threshold` default to the fleet's own defaults for the cohort (degree
2*ceil(log2 n), at least 4, even, plus the client itself, as Flower counts
shares; threshold a majority of the degree). The first round of each run
(Ray's actors starting) is printed but left out of the median.
"""

import argparse
import json
import math
import statistics
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Driver, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def default_shares(n: int) -> tuple[int, int]:
    """Flower's (num_shares, reconstruction_threshold) for the fleet's
    default neighbourhood: Flower counts the client itself among its
    shares (it asks for an odd number), so num_shares is the fleet's degree
    plus one; the threshold is the fleet's."""
    log = math.ceil(math.log2(max(n, 2)))
    degree = min(max(2 * log, 4), 254, n - 1)
    degree = max(degree, 2)
    degree += degree % 2
    return degree + 1, min(degree // 2 + 1, degree)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's fit starts and ends."""

    def __init__(self, times, **kw):
        super().__init__(**kw)
        self.times = times
        self.started = None

    def configure_fit(self, server_round, parameters, client_manager):
        self.started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        self.times.append(
            {
                "round": server_round,
                "seconds": time.perf_counter() - self.started,
                "results": len(results),
                "failures": len(failures),
            }
        )
        return out


def run(clients: int, dim: int, rounds: int, secure: bool, shares: int, threshold: int):
    times = []

    class Vector(NumPyClient):
        def __init__(self, cid: int):
            rng = np.random.default_rng(cid)
            self.vector = rng.uniform(-0.5, 0.5, dim).astype(np.float32)

        def fit(self, parameters, config):
            return [self.vector], 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    def client_fn(context: Context):
        return Vector(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    server = ServerApp()

    @server.main()
    def main(driver: Driver, context: Context) -> None:
        strategy = TimedFedAvg(
            times,
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=clients,
            min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        if secure:
            fit = SecAggPlusWorkflow(
                num_shares=shares,
                reconstruction_threshold=threshold,
                timeout=60,
            )
            DefaultWorkflow(fit_workflow=fit)(driver, legacy)
        else:
            DefaultWorkflow()(driver, legacy)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--dim", type=int, default=199_210)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shares", type=int)
    ap.add_argument("--threshold", type=int)
    args = ap.parse_args()
    shares, threshold = default_shares(args.clients)
    shares = args.shares or shares
    threshold = args.threshold or threshold
    rows = {}
    for secure in (False, True):
        name = "secagg+" if secure else "plain"
        rows[name] = run(args.clients, args.dim, args.rounds, secure, shares, threshold)
    print(json.dumps({"clients": args.clients, "dim": args.dim, "shares": shares,
                      "threshold": threshold, "rounds": rows}, indent=1))
    for name, times in rows.items():
        secs = [t["seconds"] for t in times[1:]] or [float("nan")]
        each = ", ".join("%.3f" % t["seconds"] for t in times)
        print(f"{name}: median round {statistics.median(secs):.3f} s over rounds 2..{len(times)} "
              f"(every round: {each})")


if __name__ == "__main__":
    main()
