"""Held-out Python-docs windows for the fine-tuning benchmark: calibration-domain text that no calibration window of
protocol P or A1 touches, to show that fine-tuning on the calibration windows does not overfit them.

Both protocols' calibration windows are regenerated from the text and checked against the shared .npy files
(P: the file read as is, tokenized once, 128 × 2048, starts ``random.Random(0).randint(0, n - 2048 - 1)``; A1: the
lines joined with a space, 32 × 512, same rule). Every window is mapped back to its characters in the original file;
a held-out window is one whose characters overlap none of them. From the free stretches, non-overlapping windows
are cut and ``--count`` of them, evenly spread over the file, are kept.

    python benchmarks/heldout_windows.py --tokenizer models/smollm2-135m --out .gpudata/heldout
    # -> heldout_p.npy (32 x 2048, P tokenization), heldout_a1.npy (32 x 512, A1 tokenization), heldout.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def starts(n: int, count: int, seqlen: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(0, n - seqlen - 1) for _ in range(count)]


def a1_text(raw: str) -> tuple[str, np.ndarray]:
    """The A1 reading (lines with their newline, a blank line as '', joined with ' ') and, per character, its
    position in ``raw`` (-1 for the joining spaces)."""
    lines = raw.splitlines(keepends=True)
    kept = ["" if line.strip() == "" else line for line in lines]
    pos, chunks, offset = [], [], 0
    for i, (line, k) in enumerate(zip(lines, kept)):
        if i:
            chunks.append(" ")
            pos.append(np.array([-1]))
        chunks.append(k)
        pos.append(np.arange(offset, offset + len(k)))
        offset += len(line)
    return "".join(chunks), np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)


def token_chars(tok, text: str) -> tuple[np.ndarray, np.ndarray]:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return np.array(enc["input_ids"], dtype=np.int64), np.array(enc["offset_mapping"], dtype=np.int64)


def cover(covered: np.ndarray, offsets: np.ndarray, char_map: np.ndarray | None, s: int, L: int) -> None:
    a, b = offsets[s, 0], offsets[s + L - 1, 1]
    if char_map is None:
        covered[a:b] = True
    else:
        orig = char_map[a:b]
        covered[orig[orig >= 0]] = True


def pick(offsets: np.ndarray, char_map: np.ndarray | None, covered: np.ndarray, L: int, count: int) -> list[int]:
    """``count`` non-overlapping windows of ``L`` tokens whose characters are all free, spread over the text."""
    n = len(offsets)
    if char_map is not None:  # coverage in the A1 string's characters (the joining spaces are never covered)
        covered = np.where(char_map >= 0, covered[np.clip(char_map, 0, None)], False)
    cs = np.concatenate([[0], np.cumsum(covered)])
    a, b = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    free_tok = cs[np.minimum(b, len(covered))] - cs[np.minimum(a, len(covered))] == 0
    candidates, t = [], 0
    while t + L <= n:
        bad = np.nonzero(~free_tok[t : t + L])[0]
        if bad.size == 0:
            candidates.append(t)
            t += L
        else:
            t += int(bad[-1]) + 1
    if len(candidates) < count:
        raise SystemExit(f"only {len(candidates)} free windows of {L} tokens; asked for {count}")
    idx = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[i] for i in idx]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m"))
    p.add_argument("--text", default=str(SHARED / "python-docs" / "python-docs.txt"))
    p.add_argument("--data", default=str(SHARED), help="folder with p/ and a1/ calibration windows")
    p.add_argument("--out", default=str(ROOT / ".gpudata" / "heldout"))
    p.add_argument("--count", type=int, default=32)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    raw = Path(args.text).read_text(encoding="utf-8")
    covered = np.zeros(len(raw) + 1, dtype=bool)

    ids_p, off_p = token_chars(tok, raw)
    text_a1, map_a1 = a1_text(raw)
    ids_a1, off_a1 = token_chars(tok, text_a1)
    info = {"text": args.text, "chars": len(raw), "tokens_p": len(ids_p), "tokens_a1": len(ids_a1)}
    protocols = (("p", ids_p, off_p, None, 2048, 128), ("a1", ids_a1, off_a1, map_a1, 512, 32))
    for name, ids, off, cmap, L, count in protocols:
        calib = np.load(Path(args.data) / name / "calibration_windows.npy")
        st = starts(len(ids), count, L)
        regenerated = np.stack([ids[s : s + L] for s in st])
        match = bool(calib.shape == regenerated.shape and (calib == regenerated).all())
        info[f"calibration_{name}_reproduced"] = match
        if not match:
            raise SystemExit(f"{name}: regenerated calibration windows differ from {name}/calibration_windows.npy")
        for s in st:
            cover(covered, off, cmap, s, L)
    info["calibration_chars_covered"] = float(covered.mean())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, ids, off, cmap, L in (("p", ids_p, off_p, None, 2048), ("a1", ids_a1, off_a1, map_a1, 512)):
        chosen = pick(off, cmap, covered, L, args.count)
        windows = np.stack([ids[s : s + L] for s in chosen]).astype(np.int32)
        buf = io.BytesIO()
        np.save(buf, windows)
        tmp = out / f".heldout_{name}.npy.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(out / f"heldout_{name}.npy")
        info[f"heldout_{name}"] = {"shape": list(windows.shape), "starts": chosen}
    (out / "heldout.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if not k.startswith("heldout_")}
                     | {k: v["shape"] for k, v in info.items() if k.startswith("heldout_")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
