#!/usr/bin/env python3
"""Rebuilds the embedded Fashion-MNIST subset from the full data set.

Takes, in file order, the first PER_CLASS_TRAIN examples of each class from the
training split and the first PER_CLASS_TEST of each class from the test split,
keeps their original relative order, and writes them as gzip IDX files with a
zero timestamp so that the output is byte-for-byte reproducible.

    python3 make_subset.py [/usr/share/datasets/fashion-mnist]
"""
import gzip
import struct
import sys
from pathlib import Path

PER_CLASS_TRAIN = 500
PER_CLASS_TEST = 100


def read_idx(path):
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return dims, data[4 + 4 * ndim :]


def write_idx(path, dims, payload):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
            gz.write(header + payload)


def subset(src, images, labels, per_class, out_prefix):
    (n, rows, cols), pixels = read_idx(src / images)
    (_,), ys = read_idx(src / labels)
    taken = [0] * 10
    keep = []
    for i in range(n):
        if taken[ys[i]] < per_class:
            taken[ys[i]] += 1
            keep.append(i)
    size = rows * cols
    write_idx(Path(f"{out_prefix}-images-idx3-ubyte.gz"), (len(keep), rows, cols),
              b"".join(pixels[i * size : (i + 1) * size] for i in keep))
    write_idx(Path(f"{out_prefix}-labels-idx1-ubyte.gz"), (len(keep),), bytes(ys[i] for i in keep))
    print(f"{out_prefix}: {len(keep)} examples, per class {taken}")


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
    subset(src, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", PER_CLASS_TRAIN, "train")
    subset(src, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", PER_CLASS_TEST, "test")


if __name__ == "__main__":
    main()
