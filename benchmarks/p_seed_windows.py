"""Protocol P's calibration windows for other seeds, and the WikiText-2 test file tokenized as is.

`../shared/data/p/README.md` gives the references' spread over calibration seeds 0/1/2 with the evaluation text
read as is (the file's bytes, not our evaluation form). This rebuilds those inputs the way that README describes
(the Python-docs file read as is and tokenized once; window starts `random.Random(seed).randint(0, n - L - 1)` in
order), checks that seed 0 gives exactly `p/calibration_windows.npy`, and writes `calib_seed{S}.npy` and
`wikitext_raw_ids.npy` into OUTDIR (token ids, int32), for `benchmarks/protocol.py`.

    python benchmarks/p_seed_windows.py --model models/smollm2-135m --outdir .gpudata/seeds
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder with the SmolLM2 tokenizer")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    data, out = Path(args.data), Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = tok((data / "python-docs" / "python-docs.txt").read_text(encoding="utf-8"),
              add_special_tokens=False)["input_ids"]
    n, L = len(ids), args.seqlen
    print(f"python-docs read as is: {n} tokens")
    arr = np.asarray(ids, dtype=np.int32)
    for seed in args.seeds:
        rng = random.Random(seed)
        starts = [rng.randint(0, n - L - 1) for _ in range(args.nsamples)]
        windows = np.stack([arr[s : s + L] for s in starts])
        if seed == 0:
            ref = np.load(data / "p" / "calibration_windows.npy")
            if not np.array_equal(ref, windows):
                raise SystemExit("seed 0 does not reproduce p/calibration_windows.npy: not the README's procedure")
            print("seed 0 reproduces p/calibration_windows.npy exactly")
        np.save(out / f"calib_seed{seed}.npy", windows)
    raw = tok((data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8"),
              add_special_tokens=False)["input_ids"]
    np.save(out / "wikitext_raw_ids.npy", np.asarray(raw, dtype=np.int32))
    print(f"wiki.test.raw read as is: {len(raw)} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
