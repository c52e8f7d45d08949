"""Protocol A1's calibration windows, extended: N windows drawn exactly as ``../shared/data/a1`` drew its 32.

The A1 README: the Python-docs text read line by line (each line with its newline, a blank line as an empty
string), joined with a space, tokenized once; window starts ``random.Random(0).randint(0, n - seqlen - 1)`` in
order. Drawing more starts from the same generator gives a superset whose first 32 windows *are* A1's (checked
here), so a run on it differs from A1 only by the extra calibration data (the data-scaling study in BENCHMARKS.md).

    python benchmarks/a1_more_calibration.py --model models/smollm2-135m --windows 128 --output /tmp/cal128x512.npy
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder with the SmolLM2 tokenizer")
    p.add_argument("--text", default="../shared/data/python-docs/python-docs.txt")
    p.add_argument("--a1", default="../shared/data/a1/calibration_windows.npy")
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    with open(args.text, encoding="utf-8") as f:
        lines = [line if line.strip() else "" for line in f]
    ids = AutoTokenizer.from_pretrained(args.model)(" ".join(lines))["input_ids"]
    rng = random.Random(0)
    starts = [rng.randint(0, len(ids) - args.seqlen - 1) for _ in range(args.windows)]
    windows = np.array([ids[s: s + args.seqlen] for s in starts], dtype=np.int32)
    a1 = np.load(args.a1)
    k = min(len(a1), args.windows)
    if a1.shape[1] == args.seqlen and not np.array_equal(windows[:k], a1[:k]):
        raise SystemExit(f"the first {k} windows differ from {args.a1}: the tokenization or the draw is not A1's")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, windows)
    print(f"{len(ids):,} tokens; {args.windows} x {args.seqlen} windows -> {args.output} "
          f"(first {k} identical to {args.a1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
