"""Diagnostic: layer-wise baselines calibrated in two stages per decoder layer (attention linears on the dense
layer's inputs, then the FFN linears on the outputs of the pruned attention), between the scripts' one pass and
GPTQ/SparseGPT's four-group ``--true-sequential``. Runs ``protocol.py`` with ``--true-sequential`` and that stage
split patched in; same arguments otherwise. Not a product option: it asks which within-layer calibration order the
independent baseline numbers of ``../shared/data/p/README.md`` may have used.

    python benchmarks/sequential_stages.py --model models/smollm2-135m --calibration ../shared/data/p/calibration_windows.npy \\
        --eval ../shared/data/p/eval_ids.npy --eval-seqlen 2048 --method wanda --structure 2:4 --target-size 0.5 \\
        --no-dense-eval --batch-size 8 --threads 2 --eval-batch-size 1 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgeon_core.sequential as seq  # noqa: E402


def _two_stages(groups, adapter) -> list[list[tuple[str, ...]]]:
    attention = set(adapter.attention_in) | {adapter.attention_out}
    return [[g for g in groups if g[0] in attention], [g for g in groups if g[0] not in attention]]


if __name__ == "__main__":
    seq._sequential_stages = _two_stages
    import protocol

    raise SystemExit(protocol.main(sys.argv[1:] + ["--true-sequential", "--tag", "two-stage"]))
