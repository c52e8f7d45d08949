"""Protocol P's calibration windows for other seeds, and the WikiText-2 test file tokenized as is.

`../shared/data/p/README.md` gives the references' spread over calibration seeds 0/1/2 with the evaluation text
read as is (the file's text, not our evaluation form). This rebuilds those inputs with the product's own data
functions (`surgeon.data.load_ids(..., join=None)`: the file read as is; `calibration_windows(ids, n, L, seed)`: the
SparseGPT/Wanda sampler), checks that seed 0 gives exactly `p/calibration_windows.npy`, and writes
`calib_seed{S}.npy` and `wikitext_raw_ids.npy` into OUTDIR (int32 token ids) for `benchmarks/protocol.py`.

    python benchmarks/p_seed_windows.py --model models/smollm2-135m --outdir .gpudata/seeds
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgeon import data as D  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder with the SmolLM2 tokenizer")
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--data", default=str(DATA), help="the shared data folder")
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    data, out = Path(args.data), Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    ids = D.load_ids(data / "python-docs" / "python-docs.txt", tok, join=None)
    print(f"python-docs read as is: {ids.numel()} tokens")
    for seed in args.seeds:
        windows = D.calibration_windows(ids, args.nsamples, args.seqlen, seed=seed).numpy().astype(np.int32)
        if seed == 0 and (args.nsamples, args.seqlen) == (128, 2048):
            if not np.array_equal(np.load(data / "p" / "calibration_windows.npy"), windows):
                raise SystemExit("seed 0 does not reproduce p/calibration_windows.npy")
            print("seed 0 reproduces p/calibration_windows.npy exactly")
        np.save(out / f"calib_seed{seed}.npy", windows)
    raw = D.load_ids(data / "wikitext-2-raw" / "wiki.test.raw", tok, join=None)
    np.save(out / "wikitext_raw_ids.npy", raw.numpy().astype(np.int32))
    print(f"wiki.test.raw read as is: {raw.numel()} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
