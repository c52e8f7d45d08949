"""Diagnostic: layer-wise baselines calibrated on the *dense* model's activations (every decoder layer's inputs are
the outputs of the unpruned layers before it), instead of the sequential calibration of the SparseGPT and Wanda
papers (inputs from the already pruned layers). Runs ``protocol.py`` with the calibration driver's propagation
patched to use each layer's dense weights (the pruned weights stay in the model, which is what is evaluated); same
arguments otherwise. Not a product option: it asks whether the independent baseline numbers of
``../shared/data/p/README.md`` may have come from this procedure (see ``sequential_stages.py`` for another order).

    python benchmarks/dense_inputs.py --model models/smollm2-135m --calibration ../shared/data/p/calibration_windows.npy \\
        --eval ../shared/data/p/eval_ids.npy --eval-seqlen 2048 --method wanda --structure 2:4 --target-size 0.5 \\
        --no-dense-eval --batch-size 8 --threads 2 --eval-batch-size 1 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import surgeon_core.sequential as seq  # noqa: E402

_dense: dict[int, dict[str, torch.Tensor]] = {}
_calibrate, _run_layer = seq._calibrate, seq._run_layer


def _calibrate_keeping_dense(layer, *args, **kwargs):
    """Calibrate as usual, after keeping a copy of the layer's dense weights (the previous layer's is dropped)."""
    _dense.clear()
    _dense[id(layer)] = {name: p.detach().clone() for name, p in layer.named_parameters()}
    return _calibrate(layer, *args, **kwargs)


def _run_layer_dense(layer, batch, device):
    """The layer's output computed with its dense weights, whatever the pruning left in it."""
    dense = _dense.get(id(layer))
    if dense is None:
        return _run_layer(layer, batch, device)
    out = torch.func.functional_call(layer, dense, (batch.hidden.to(device), *seq._to(batch.args, device)),
                                     seq._to(batch.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


if __name__ == "__main__":
    if "--true-sequential" in sys.argv:
        raise SystemExit("dense_inputs.py: --true-sequential contradicts calibrating on the dense model")
    seq._calibrate, seq._run_layer = _calibrate_keeping_dense, _run_layer_dense
    import protocol

    raise SystemExit(protocol.main(sys.argv[1:] + ["--tag", "dense-inputs"]))
