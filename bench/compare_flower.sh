#!/usr/bin/env bash
# fleet-sim and Flower side by side on the same task (sim/fleets/flower-compare.toml
# and bench/flower_fashion.py), run one after the other on this machine, for
# each seed in SEEDS (default "1 2 3": one run's curve is noisy with 10 non-IID
# clients a round, so curves are compared as means over seeds).
#
# Flower runs twice a seed: once drawing its own partition, initial model and
# clients (the independent comparison, and the timings), and once replaying
# fleet-sim's draws of that seed (`--task`: same initial model, same
# examples per client, same clients each round), which compares the curves
# round by round with only the batch order and the arithmetic differing.
#
#   bash bench/compare_flower.sh [OUT_DIR]        (default: runs/flower)
#   SEEDS="1" bash bench/compare_flower.sh        (one seed)
#   SEEDS="6 7" bash bench/compare_flower.sh      (more seeds into the same OUT_DIR, then
#   SEEDS="$(seq -s' ' 1 7)" REPORT_ONLY=1 bash bench/compare_flower.sh   the table over all)
#   REPLAY_ONLY=1 ...                             (fleet-sim and the replay only, keeping the
#                                                  seeds' earlier independent Flower runs)
#
# Needs: bench/.venv with flwr[simulation], torch and psutil (see bench/README.md),
# the full Fashion-MNIST (apt-get install dataset-fashion-mnist).
# Flower's peak memory comes from a run of its own with the sampler on (the
# first seed, or MEMORY_SEED), not from the timed runs.
# Writes OUT_DIR/seed-N/{fleet-sim/, fleet-sim.time, flower.json, flower-memory.json, flower.csv,
# flower.log, flower.time, replay.json, replay.log}, OUT_DIR/{conditions.txt,
# table.md, fleet-sim-mean.csv, flower-mean.csv, replay-mean.csv, accuracy.svg}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/flower}
SEEDS=${SEEDS:-1 2 3}
PY=${PY:-bench/.venv/bin/python}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$OUT"

cargo build --release -p fleet-sim --bins --examples
if [ -z "${REPORT_ONLY:-}" ]; then
{
    echo "date: $(date -u +%FT%TZ)"
    echo "cpus: $(nproc); memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "load before the runs (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "flower: $($PY -c 'import flwr, ray, torch; print(f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}")')"
    echo "seeds: $SEEDS"
} | tee -a "$OUT/conditions.txt"

for seed in $SEEDS; do
    dir="$OUT/seed-$seed"
    mkdir -p "$dir"
    echo "== seed $seed: fleet-sim"
    /usr/bin/time -v "$TARGET/release/fleet-sim" --quiet --fleet sim/fleets/flower-compare.toml \
        --set "seed=$seed" --export-task --out "$dir/fleet-sim" 2> "$dir/fleet-sim.time"
    grep -E "Elapsed" "$dir/fleet-sim.time"
    echo "load after fleet-sim, seed $seed: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/conditions.txt"
    if [ -z "${REPLAY_ONLY:-}" ]; then
        echo "== seed $seed: flower"
        /usr/bin/time -v "$PY" bench/flower_fashion.py --seed "$seed" --json "$dir/flower.json" \
            > "$dir/flower.log" 2> "$dir/flower.time"
        grep -E "Elapsed" "$dir/flower.time"
        echo "load after flower, seed $seed: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/conditions.txt"
        # Memory in a run of its own: the sampler slows the run it watches.
        if [ "$seed" = "${MEMORY_SEED:-${SEEDS%% *}}" ]; then
            echo "== seed $seed: flower, peak memory"
            "$PY" bench/flower_fashion.py --seed "$seed" --memory --json "$dir/flower-memory.json" \
                > "$dir/flower-memory.log" 2>&1
        fi
    fi
    echo "== seed $seed: flower replaying fleet-sim's draws"
    "$PY" bench/flower_fashion.py --seed "$seed" --task "$dir/fleet-sim" --json "$dir/replay.json" \
        > "$dir/replay.log" 2>&1
    grep -E "total_wall_s" "$dir/replay.log" | tail -1
done
fi

"$PY" - "$OUT" $SEEDS <<'EOF'
import json, re, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]

def elapsed(path):
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", open(path).read())
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(m.group(1).split(":"))))

def max_rss(path):
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read()).group(1)) * 1024

sim = {"rounds": [], "walls": [], "mem": [], "curves": []}
replay = []
flo = {"rounds": [], "walls": [], "mem": [], "rss": [], "curves": []}
for s in seeds:
    d = f"{out}/seed-{s}"
    logs = json.load(open(f"{d}/fleet-sim/rounds.json"))
    sim["rounds"] += [r["wall_s"] for r in logs]
    sim["walls"].append(elapsed(f"{d}/fleet-sim.time"))
    sim["mem"].append(max_rss(f"{d}/fleet-sim.time"))
    sim["curves"].append([r["accuracy"] for r in logs])
    fl = json.load(open(f"{d}/flower.json"))
    with open(f"{d}/flower.csv", "w") as f:
        f.write("round,accuracy,loss,seconds\n")
        for r in fl["rounds"]:
            f.write(f"{r['round']},{r['accuracy']},{r['loss']},{r['seconds']}\n")
    flo["rounds"] += [r["seconds"] for r in fl["rounds"]]
    flo["walls"].append(elapsed(f"{d}/flower.time"))
    try:
        fm = json.load(open(f"{d}/flower-memory.json"))
        flo["mem"].append(fm["peak_pss_sum_bytes"])
        flo["rss"].append(fm["peak_rss_sum_bytes"])
    except FileNotFoundError:
        pass
    flo["curves"].append([r["accuracy"] for r in fl["rounds"]])
    replay.append([r["accuracy"] for r in json.load(open(f"{d}/replay.json"))["rounds"]])
    versions = f"flower {fl['flwr']} (ray {fl['ray']}, torch {fl['torch']})"

def mean_curve(curves):
    n = min(len(c) for c in curves)
    return [100 * statistics.mean(c[i] for c in curves) for i in range(n)]

ms, mf, mr = mean_curve(sim["curves"]), mean_curve(flo["curves"]), mean_curve(replay)
for name, curve in (("fleet-sim", ms), ("flower", mf), ("replay", mr)):
    with open(f"{out}/{name}-mean.csv", "w") as f:
        f.write("round,accuracy\n")
        for i, a in enumerate(curve):
            f.write(f"{i + 1},{a / 100}\n")
n = min(len(ms), len(mf))
diff = [a - b for a, b in zip(ms[:n], mf[:n])]
last5 = lambda c: statistics.mean(c[-5:])
rows = [
    ("fleet-sim", sim, ms),
    (versions, flo, mf),
]
lines = [
    f"{len(seeds)} seed(s): {' '.join(seeds)}; accuracy: mean over seeds",
    "",
    "| system | median round (s) | total wall per run (s, mean) | peak memory (MiB, max) | final accuracy | mean accuracy, last 5 rounds |",
    "| --- | --- | --- | --- | --- | --- |",
]
mem = lambda r: f"{max(r['mem']) / 2**20:.0f}" if r["mem"] else "not measured"
for name, r, curve in rows:
    lines.append(
        f"| {name} | {statistics.median(r['rounds']):.3f} | {statistics.mean(r['walls']):.1f} | "
        f"{mem(r)} | {curve[-1]:.2f}% | {last5(curve):.2f}% |"
    )
lines += [
    "",
    f"median round: fleet-sim {statistics.median(flo['rounds']) / statistics.median(sim['rounds']):.1f}x faster; "
    f"total wall: {statistics.mean(flo['walls']) / statistics.mean(sim['walls']):.1f}x",
    "peak memory: fleet-sim is one process (maximum RSS, /usr/bin/time); flower is its whole process tree, "
    "summed proportional set sizes, from a run of its own with the memory sampler (summed RSS, counting "
    f"shared pages once per process: {max(flo['rss']) / 2**20 if flo['rss'] else float('nan'):.0f} MiB)",
    "mean accuracy difference per round (fleet-sim - flower, points): " + ", ".join(f"{d:+.1f}" for d in diff),
    f"mean |difference| from round 5 on {statistics.mean(abs(d) for d in diff[4:]):.2f} points",
    f"mean |difference| {statistics.mean(abs(d) for d in diff):.2f} points, largest {max(abs(d) for d in diff):.2f}; "
    f"last 5 rounds {last5(ms) - last5(mf):+.2f} points",
]
for s, c1, c2 in zip(seeds, sim["curves"], flo["curves"]):
    lines.append(f"seed {s}: final fleet-sim {100 * c1[-1]:.2f}%, flower {100 * c2[-1]:.2f}%")
# Paired: each seed's fleet-sim curve against Flower replaying that seed's draws.
paired = [[100 * (a - b) for a, b in zip(c1, c2)] for c1, c2 in zip(sim["curves"], replay)]
n = min(len(p) for p in paired)
pmean = [statistics.mean(p[i] for p in paired) for i in range(n)]
within = sum(abs(d) <= 2 for d in pmean)
lines += [
    "",
    "paired (flower replaying fleet-sim's initial model, client data and clients of each round):",
    f"| fleet-sim | {last5(ms):.2f}% (last 5, mean over seeds) | flower replay | {last5(mr):.2f}% |",
    "mean accuracy difference per round (fleet-sim - flower replay, points): " + ", ".join(f"{d:+.1f}" for d in pmean),
    f"mean |difference| {statistics.mean(abs(d) for d in pmean):.2f} points, largest {max(abs(d) for d in pmean):.2f}; "
    f"rounds within 2 points: {within} of {n}",
]
if len(paired) > 1:
    sd = [statistics.stdev(p[i] for p in paired) for i in range(n)]
    lines.append("spread of the per-seed differences (standard deviation, points): " + ", ".join(f"{d:.1f}" for d in sd))
for s, c1, c2 in zip(seeds, sim["curves"], replay):
    lines.append(f"seed {s}: final fleet-sim {100 * c1[-1]:.2f}%, flower replay {100 * c2[-1]:.2f}%")
open(f"{out}/table.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

"$TARGET/release/examples/accuracy_plot" --out "$OUT/accuracy.svg" \
    --title "Fashion-MNIST, 2NN, 100 clients Dirichlet(0.5), 10 a round (mean over seeds)" \
    "fleet-sim=$OUT/fleet-sim-mean.csv" "flower=$OUT/flower-mean.csv" \
    "flower replaying fleet-sim's draws=$OUT/replay-mean.csv"
echo "plot: $OUT/accuracy.svg"
