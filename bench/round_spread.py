"""Round-1 test accuracy of a fleet-sim run's first cohort over several batch
orders, trained with PyTorch: the counterpart of
`cargo run --release -p fleet-sim --example round_spread` (see there).

    bench/.venv/bin/python bench/round_spread.py --run runs/r1 --reps 12
"""

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flower_fashion as ff  # noqa: E402  (the same data, model and training settings)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="fleet-sim run directory written with --export-task")
    ap.add_argument("--reps", type=int, default=12, help="batch orders to try")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ff.TASK_DIR = os.path.abspath(args.run)
    task = ff.fleet_task()
    cohort, initial = task["cohorts"][0], ff.fleet_initial_state()
    x, y = ff.dataset("train")
    xt, yt = ff.dataset("t10k")
    accuracies = []
    for rep in range(args.reps):
        total = {k: torch.zeros_like(v) for k, v in initial.items()}
        examples = 0
        for k in cohort:
            idx = torch.from_numpy(ff.partition(k))
            xs, ys = x[idx], y[idx]
            model = ff.two_nn()
            model.load_state_dict(initial)
            opt = torch.optim.SGD(model.parameters(), lr=ff.LR)
            loss_fn = nn.CrossEntropyLoss()
            order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(1000 * rep + k))
            for start in range(0, len(idx), ff.BATCH):
                b = order[start : start + ff.BATCH]
                opt.zero_grad()
                loss_fn(model(xs[b]), ys[b]).backward()
                opt.step()
            for name, value in model.state_dict().items():
                total[name] += value * len(idx)
            examples += len(idx)
        model = ff.two_nn()
        model.load_state_dict({k: v / examples for k, v in total.items()})
        with torch.no_grad():
            accuracies.append(100 * (model(xt).argmax(1) == yt).float().mean().item())
    print(
        f"pytorch {torch.__version__}, seed {task['seed']}, round 1, {args.reps} batch orders: "
        f"mean {np.mean(accuracies):.2f}% sd {np.std(accuracies, ddof=1):.2f} "
        f"({' '.join(f'{a:.1f}' for a in accuracies)})"
    )


if __name__ == "__main__":
    main()
