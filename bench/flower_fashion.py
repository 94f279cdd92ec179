"""Flower baseline for the fleet simulator: FedAvg on Fashion-MNIST.

The task matches sim/fleets/flower-compare.toml: the full Fashion-MNIST
(60,000 training, 10,000 test images), the 2NN (784-200-200-10, ReLU), 100
clients holding a Dirichlet(0.5) label partition, 10 clients sampled per
round, 1 local epoch, batch 32, plain SGD with lr 0.05, FedAvg weighted by
example count, 20 rounds, and central evaluation of the global model on the
whole test set before the first round and after every round.

It runs Flower's simulation runtime (`flwr[simulation]`, Ray backend), one
CPU per client actor and one torch thread per actor. Inputs are normalised
as in fleet-models: (pixel/255 - 0.2860)/0.3530. Local training slices
shuffled tensors directly (no DataLoader), which is the cheapest way to
feed PyTorch, so the Flower side is not slowed by data loading.

With --task RUN_DIR (a fleet-sim run directory written with
--export-task), Flower replays fleet-sim's run of the same task instead of
drawing its own: the same initial model, the same examples on each client,
in each round the same clients (the devices whose reports fleet-sim
aggregated, from rounds.json), and on each client the same batches in the
same order. Only the arithmetic differs (PyTorch's kernels against
burn's), so the two accuracy curves can be compared round by round
without the spread of independent draws.

The apps live in this module, imported by name (`flower_fashion`, with
this directory on PYTHONPATH for Ray's workers), never in `__main__`:
Flower sends its client-app loader with every message, and Ray pickles
functions of `__main__` by value, globals included. Run as `__main__`, each
client call would arrive with a fresh copy of the module's cache (the
driver's test set, 31 MB, shipped with every message) and load and
normalise the 60,000 training images again; imported by name, the workers
import the module once and keep its cache for the run.

Output: a JSON file with the Flower and torch versions, one entry per round
(accuracy, loss, seconds since the previous evaluation) and the total wall
time. With --memory, also the peak memory of the whole process tree (this
process, Ray's services and its worker processes), sampled every 0.2 s, as
summed proportional set sizes (shared pages split among their sharers) and
summed resident set sizes (shared pages counted once per process); the
sampler costs time (it reads every process's smaps), so timings come from
runs without it.

    bench/.venv/bin/python bench/flower_fashion.py --json runs/flower/flower.json
    bench/.venv/bin/python bench/flower_fashion.py --memory --json runs/flower/flower-memory.json
"""

import argparse
import gzip
import json
import os
import random
import struct
import threading
import time

import numpy as np
import psutil
import torch
from torch import nn

import flwr
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

DATA_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
CLIENTS = 100
PER_ROUND = 10
ROUNDS = 20
EPOCHS = 1
BATCH = 32
LR = 0.05
ALPHA = 0.5
SEED = int(os.environ.get("FLOWER_SEED", "1"))
# A fleet-sim run directory to replay (see --task); empty: draw everything here.
TASK_DIR = os.environ.get("FLOWER_TASK", "")
MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


_CACHE = {}


def dataset(split):
    """Normalised images and labels of `split` ("train" or "t10k"), cached per process."""
    if split not in _CACHE:
        x = read_idx(os.path.join(DATA_DIR, f"{split}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(DATA_DIR, f"{split}-labels-idx1-ubyte.gz"))
        x = (x.reshape(len(x), -1).astype(np.float32) / 255.0 - MEAN) / STD
        _CACHE[split] = (torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    return _CACHE[split]


def dirichlet_partition(labels, clients, alpha, seed):
    """Per class, split its examples across clients with Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(clients)]
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(clients, alpha))
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def fleet_task():
    """fleet-sim's exported task and per-round cohorts, cached per process."""
    if "task" not in _CACHE:
        try:
            with open(os.path.join(TASK_DIR, "task.json")) as f:
                task = json.load(f)
            with open(os.path.join(TASK_DIR, "rounds.json")) as f:
                task["cohorts"] = [r["devices"] for r in json.load(f)]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(
                f"{TASK_DIR}: not a fleet-sim run directory written with --export-task ({e}); "
                "run fleet-sim --export-task --out DIR first"
            )
        if task["model"] != "2nn" or task["devices"] is None or "orders" not in task:
            raise SystemExit(
                f"{TASK_DIR}: expected a 2nn run on a partitioned data set, exported with batch orders "
                "(re-run fleet-sim --export-task)"
            )
        _CACHE["task"] = task
    return _CACHE["task"]


def fleet_initial_state():
    """The exported initial model as a state dict of two_nn() (dense weights
    are stored [inputs, outputs], torch's Linear wants [outputs, inputs])."""
    task = fleet_task()
    flat = np.asarray(task["initial"], dtype=np.float32)
    state = {}
    for entry in task["layout"]:
        layer, kind = entry["name"].split(".")
        value = flat[entry["offset"] : entry["offset"] + entry["len"]].reshape(entry["shape"])
        if kind == "weight":
            value = value.T
        state[f"{2 * int(layer.removeprefix('dense'))}.{kind}"] = torch.from_numpy(value.copy())
    return state


def partition(k):
    if "parts" not in _CACHE:
        if TASK_DIR:
            parts = [np.array(p, dtype=np.int64) for p in fleet_task()["devices"]]
        else:
            _, y = dataset("train")
            parts = dirichlet_partition(y.numpy(), CLIENTS, ALPHA, SEED)
        _CACHE["parts"] = parts
    return _CACHE["parts"][k]


def two_nn():
    return nn.Sequential(
        nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10)
    )


client = ClientApp()


@client.train()
def train(msg: Message, context: Context):
    torch.set_num_threads(1)
    # Replaying fleet-sim, the server names the client's examples.
    k = int(msg.content["config"].get("client", context.node_config["partition-id"]))
    model = two_nn()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = dataset("train")
    idx = torch.from_numpy(partition(k))
    xs, ys = x[idx], y[idx]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    server_round = int(msg.content["config"]["server-round"])
    g = torch.Generator().manual_seed((SEED << 32) ^ (server_round << 16) ^ k)
    # Replaying fleet-sim, the client also visits its examples in fleet-sim's order.
    replayed = fleet_task()["orders"][server_round - 1][str(k)] if TASK_DIR else None
    total, seen = 0.0, 0
    for epoch in range(EPOCHS):
        if replayed is not None:
            order = torch.tensor(replayed[epoch], dtype=torch.int64)
        else:
            order = torch.randperm(len(idx), generator=g)
        for start in range(0, len(idx), BATCH):
            b = order[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(xs[b]), ys[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            seen += len(b)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": total / max(seen, 1), "num-examples": len(idx)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


RESULTS = {"rounds": []}
_LAST = [None]


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = two_nn()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = dataset("t10k")
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    now = time.perf_counter()
    if server_round > 0:
        RESULTS["rounds"].append(
            {"round": server_round, "accuracy": acc, "loss": loss, "seconds": now - _LAST[0]}
        )
        print(f"round {server_round}: accuracy {100 * acc:.2f}% loss {loss:.4f} "
              f"({now - _LAST[0]:.2f} s)", flush=True)
    _LAST[0] = now
    return MetricRecord({"accuracy": acc, "loss": loss})


class ReplayFedAvg(FedAvg):
    """FedAvg whose round r trains the clients fleet-sim aggregated in its
    round r: any len(cohort) nodes are sampled and each is told which
    client's examples to train on (clients are stateless, so this is the
    same as sampling those clients)."""

    def configure_train(self, server_round, arrays, config, grid):
        cohort = fleet_task()["cohorts"][server_round - 1]
        self.min_train_nodes = len(cohort)
        messages = list(super().configure_train(server_round, arrays, config, grid))[: len(cohort)]
        out = []
        for message, client in zip(messages, cohort):
            own = ConfigRecord(dict(message.content["config"]))
            own["client"] = int(client)
            content = RecordDict({"arrays": message.content["arrays"], "config": own})
            out.append(Message(content=content, message_type=message.metadata.message_type,
                               dst_node_id=message.metadata.dst_node_id))
        return out


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(SEED)
    random.seed(SEED)  # Flower samples the round's nodes with the random module
    replay = bool(TASK_DIR)
    strategy = (ReplayFedAvg if replay else FedAvg)(
        fraction_train=PER_ROUND / CLIENTS,
        fraction_evaluate=0.0,
        min_train_nodes=PER_ROUND,
        min_available_nodes=CLIENTS,
    )
    model = two_nn()
    if replay:
        model.load_state_dict(fleet_initial_state())
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=len(fleet_task()["cohorts"]) if replay else ROUNDS,
        evaluate_fn=central_evaluate,
    )


class PeakMemory:
    """Samples the memory of this process and all its descendants.

    Two sums: resident set sizes (RSS; pages shared between processes, such
    as Ray's object store and the libraries, count once per process) and
    proportional set sizes (PSS; a shared page is split among its sharers,
    so the sum is the tree's real footprint).
    """

    def __init__(self, period=0.2):
        self.period, self.stop = period, threading.Event()
        self.peak_rss, self.peak_pss = 0, 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self):
        me = psutil.Process()
        rss = pss = 0
        for p in [me] + me.children(recursive=True):
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += info.pss
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.period)


def main_cli():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1,
                    help="seed of the partition, the initial model, the sampling and the batch order")
    ap.add_argument("--memory", action="store_true",
                    help="sample the process tree's memory every 0.2 s (slows the run: time without it)")
    ap.add_argument("--task", metavar="RUN_DIR",
                    help="replay a fleet-sim run directory written with --export-task: "
                         "its initial model, client data and per-round clients")
    args = ap.parse_args()
    # Ray's worker processes read the seed and the task from the environment they inherit.
    global SEED, TASK_DIR
    SEED = args.seed
    os.environ["FLOWER_SEED"] = str(SEED)
    if args.task:
        TASK_DIR = os.path.abspath(args.task)
        os.environ["FLOWER_TASK"] = TASK_DIR
        fleet_task()  # fail early on a bad directory
    torch.set_num_threads(1)
    mem = PeakMemory()
    if args.memory:
        mem.thread.start()
    start = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - start
    mem.stop.set()
    if args.memory:
        mem.sample()
    secs = sorted(r["seconds"] for r in RESULTS["rounds"])
    n = len(secs)
    median = (secs[n // 2] if n % 2 else (secs[n // 2 - 1] + secs[n // 2]) / 2) if n else None
    out = {
        "framework": "flower",
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "ray": __import__("ray").__version__,
        "cpus": os.cpu_count(),
        "seed": SEED,
        "task": TASK_DIR or None,
        "rounds": RESULTS["rounds"],
        "median_round_s": median,
        "total_wall_s": wall,
        "peak_rss_sum_bytes": mem.peak_rss if args.memory else None,
        "peak_pss_sum_bytes": mem.peak_pss if args.memory else None,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    # Run the copy imported by name (see the module docs), and let Ray's
    # workers import it too.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p
    )
    import flower_fashion

    flower_fashion.main_cli()
