#!/usr/bin/env python3
"""Runs exported fleet ONNX artifacts in onnxruntime (single thread).

Two modes, both driven from Rust (see docs/inference.md):

  run    --cases CASES.json
         CASES.json is a list of {"model": "x.onnx", "input": "x.in.f32",
         "output": "x.ort.f32", "features": 784}; each input file holds
         little-endian float32 [n, features]. Writes onnxruntime's logits
         (float32, [n, classes]) to each "output" file and prints a JSON
         summary. Paths are relative to CASES.json's directory.

  bench  --model x.onnx --input x.in.f32 --features 784 --batch 1 64
         [--seconds 2] [--json]
         Times session.run on the first `batch` rows of the input:
         p50 / p99 latency per call and throughput, one intra-op and one
         inter-op thread.

Exit code 3 with a message on stderr when onnxruntime is not installed, so
callers can tell "missing" from "failed".
"""

import argparse
import json
import os
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - depends on the environment
    print(
        f"onnxruntime not available ({e}); install with: pip install onnxruntime numpy",
        file=sys.stderr,
    )
    sys.exit(3)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def load_input(path, features):
    x = np.fromfile(path, dtype="<f4")
    if x.size % features:
        raise SystemExit(f"{path}: {x.size} values is not a multiple of {features}")
    return x.reshape(-1, features)


def run_cases(cases_path):
    base = os.path.dirname(os.path.abspath(cases_path))
    with open(cases_path) as f:
        cases = json.load(f)
    summary = {"onnxruntime": ort.__version__, "cases": []}
    for c in cases:
        sess = session(os.path.join(base, c["model"]))
        x = load_input(os.path.join(base, c["input"]), c["features"])
        (logits,) = sess.run(None, {sess.get_inputs()[0].name: x})
        logits.astype("<f4").tofile(os.path.join(base, c["output"]))
        summary["cases"].append({"model": c["model"], "rows": int(x.shape[0]), "shape": list(logits.shape)})
    print(json.dumps(summary))


def bench(args):
    sess = session(args.model)
    name = sess.get_inputs()[0].name
    x = load_input(args.input, args.features)
    rows = []
    for b in args.batch:
        if b > x.shape[0]:
            raise SystemExit(f"batch {b} needs {b} input rows, file has {x.shape[0]}")
        xb = np.ascontiguousarray(x[:b])
        for _ in range(20):
            sess.run(None, {name: xb})
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or len(times) < 50:
            t0 = time.perf_counter()
            sess.run(None, {name: xb})
            times.append(time.perf_counter() - t0)
        times.sort()
        p50 = times[len(times) // 2]
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        rows.append(
            {
                "batch": b,
                "calls": len(times),
                "p50_ms": p50 * 1e3,
                "p99_ms": p99 * 1e3,
                "examples_per_s": b * len(times) / sum(times),
            }
        )
    out = {"onnxruntime": ort.__version__, "model": args.model, "rows": rows}
    if args.json:
        print(json.dumps(out))
    else:
        for r in rows:
            print(f"{args.model} batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, {r['examples_per_s']:.0f} ex/s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="write onnxruntime logits for each case")
    r.add_argument("--cases", required=True)
    b = sub.add_parser("bench", help="time one model at several batch sizes")
    b.add_argument("--model", required=True)
    b.add_argument("--input", required=True)
    b.add_argument("--features", type=int, required=True)
    b.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    b.add_argument("--seconds", type=float, default=2.0)
    b.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.mode == "run":
        run_cases(args.cases)
    else:
        bench(args)


if __name__ == "__main__":
    main()
