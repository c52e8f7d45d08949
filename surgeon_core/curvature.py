"""K-FAC curvature: F ≈ G ⊗ A per prunable linear (paper §3.1, "independence of activations and derivatives").

A = E[a aᵀ] over tokens of the layer input (with a constant-1 column where the layer has a bias), and
G = E[g gᵀ] of the gradient of the summed next-token loss with respect to the layer output. Both are summed in
float32 whatever the compute dtype and divided by the token count at the end.

Linears that read the same tensor (q/k/v, gate/up) share one input factor: it is accumulated once.

Data-parallel: when torch.distributed is initialised (or a ``process_group`` is given), each rank takes a contiguous
share of the windows and the sums and token counts are all-reduced before the division (surgeon_core.distributed),
so every rank ends with the factors of one process over all windows.

Memory: ``checkpoint_layers=True`` recomputes each decoder layer's activations in the backward pass instead of
keeping them (``torch.utils.checkpoint``, non-reentrant); the hooks skip the recomputation, so the factors are the
same as without it. ``passes`` > 1 repeats the pass over the windows once per contiguous block of decoder layers
(balanced by factor size, :func:`layer_blocks`), collecting only that block's sums, which are reduced, normalised and
stored before the next block starts: the same factors, with one block's fp32 sums alive at a time (with
``storage="packed"`` those sums are packed too wherever the Gram is one matmul, as on GPUs). ``owners``
(data-parallel; factor key -> rank) sums each factor onto its owner alone instead of onto every rank, which returns
only the factors it owns. ``storage``: how the finished factors are kept (sums and division stay fp32): "fp32"
matrices, "packed" (fp32 upper parts, :func:`pack_symmetric`: about half the memory, exact) or "bf16" (half the
memory, rounded); read them with ``KFACFactors.input_factor``/``output_factor``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import distributed
from .adapters import ArchitectureAdapter, get_submodule, prunable_linears
from .linalg import is_positive_definite
from .lm import hidden_states, sample_labels, sequence_nll

__all__ = [
    "KFACFactors",
    "accumulate_input_factor",
    "accumulate_output_factor",
    "capture_kfac",
    "estimate_kfac",
    "factor_memory",
    "passes_to_fit",
    "pack_symmetric",
    "unpack_symmetric",
    "packed_size",
    "complete_sum_",
    "layer_blocks",
    "NonFiniteCurvatureError",
    "RoundedCurvatureError",
    "check_factors",
    "symmetrize_upper_",
]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(..., D) activations or gradients -> (N, D) float32."""
    return x.reshape(-1, x.shape[-1]).float()


def _gram(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """xᵀx returned in float32, also when called from a hook inside an autocast region.

    ``dtype`` (e.g. bfloat16) runs the matmul in that dtype with products summed in fp32 inside the kernel. On
    CUDA the result is written in fp32 (``torch.mm(..., out_dtype=float32)``); where that is not available (CPU)
    the per-batch result is rounded once to ``dtype`` before it is added to the fp32 running sum (faster on CPUs
    with bf16 instructions). None keeps fp32 throughout.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if dtype is None or dtype == torch.float32:
            return x.T @ x
        y = x.to(dtype)
        if not y.is_cuda:
            return (y.T @ y).float()
        # fp32 output: a bf16 result (and split-K partial sums reduced in bf16) breaks the factors' definiteness
        try:
            return torch.mm(y.T, y, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=) on this device
            pass
        flags = torch.backends.cuda.matmul
        saved = (flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction)
        flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
        try:
            return (y.T @ y).float()
        finally:
            flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


# the narrowest column block worth a matmul of its own in the CPU's upper-triangle Gram ((k+1)/2k of the products)
_MIN_GRAM_BLOCK = 192


def _sum_is_packed(packed: bool, device: torch.device, dtype: torch.dtype | None, D: int) -> bool:
    """Whether a factor sum of side ``D`` is kept packed: asked for, and its Gram is one matmul."""
    return packed and _gram_blocks(device, dtype, D) == 1


def _gram_blocks(device: torch.device, dtype: torch.dtype | None, D: int) -> int:
    """How many column blocks the Gram of a (N, D) input on ``device`` is split into (1 = one full matmul).

    Only for the fp32 Gram on the CPU: xᵀx is symmetric, so only the blocks on and above the diagonal are
    multiplied. CUDA keeps its one matmul (its bf16 path writes an fp32 result that cannot accumulate in
    place). A sum whose Gram is one matmul can be kept packed (``packed`` accumulation)."""
    if device.type != "cpu" or (dtype is not None and dtype != torch.float32):
        return 1
    return max(1, min(4, D // _MIN_GRAM_BLOCK))


def _add_upper_gram_(acc: torch.Tensor, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """acc[b, b:] += x[:, b]ᵀ x[:, b:] for each column block b: the upper block triangle of xᵀx, in place.

    The blocks below the diagonal are left as they are; :func:`symmetrize_upper_` completes the matrix."""
    D = x.shape[1]
    step = -(-D // blocks)
    with torch.autocast(device_type=x.device.type, enabled=False):
        for i in range(0, D, step):
            acc[i : i + step, i:].addmm_(x[:, i : i + step].T, x[:, i:])
    return acc


def symmetrize_upper_(M: torch.Tensor) -> torch.Tensor:
    """Replace the strict lower triangle of the square ``M`` by the transpose of its strict upper one, in place."""
    upper = M.triu(1)
    M.triu_().add_(upper.T)
    return M


def _accumulate(S: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype | None, upper_only: bool,
                packed: bool = False) -> torch.Tensor:
    blocks = _gram_blocks(x.device, dtype, x.shape[1]) if upper_only else 1
    if blocks > 1:
        if S is None:
            S = torch.zeros(x.shape[1], x.shape[1], device=x.device, dtype=torch.float32)
        return _add_upper_gram_(S, x, blocks)
    G = _gram(x, dtype)
    if _sum_is_packed(packed, x.device, dtype, x.shape[1]):  # the same additions, entry by entry, on half the entries
        G = pack_symmetric(G)
    return G if S is None else S.add_(G)


def accumulate_input_factor(A: torch.Tensor | None, inp: torch.Tensor, *, bias: bool,
                            dtype: torch.dtype | None = None, upper_only: bool = False,
                            packed: bool = False) -> torch.Tensor:
    """A += Σ_tokens a aᵀ (unnormalised); with ``bias`` the input is augmented with a 1 (bias column last).

    ``upper_only``: only the upper triangle (diagonal included) of the sum is exact; the caller completes it with
    :func:`complete_sum_` once all tokens are in (fewer products on the CPU). ``packed`` (with ``upper_only``):
    where the Gram is one matmul (CUDA, or bf16 factor matmuls), the sum is kept as :func:`pack_symmetric` packs
    it, about half the memory; elsewhere it stays a matrix."""
    a = _flatten(inp)  # (N, C)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device, dtype=a.dtype)], dim=1)  # (N, C+1)
    return _accumulate(A, a, dtype, upper_only, packed)


def accumulate_output_factor(G: torch.Tensor | None, grad_out: torch.Tensor,
                             dtype: torch.dtype | None = None, upper_only: bool = False,
                             packed: bool = False) -> torch.Tensor:
    """G += Σ_tokens g gᵀ (unnormalised); ``upper_only`` and ``packed`` as in :func:`accumulate_input_factor`."""
    g = _flatten(grad_out)  # (N, R)
    return _accumulate(G, g, dtype, upper_only, packed)


def complete_sum_(M: torch.Tensor, n: int) -> torch.Tensor:
    """Finish a sum accumulated with ``upper_only``: a matrix gets its lower triangle from its upper one
    (:func:`symmetrize_upper_`); a packed sum (``n`` x ``n``) the same within each diagonal block, the only place
    it keeps entries below the diagonal. Either way the result equals the symmetrized matrix, packed or not."""
    if M.dim() == 2:
        return symmetrize_upper_(M)
    offset = 0
    for s, e in _pack_blocks(n):
        symmetrize_upper_(M[offset : offset + e * (e - s)].view(e, e - s)[s:e])
        offset += e * (e - s)
    return M


def packed_size(n: int) -> int:
    """Entries of a packed n x n factor (:func:`pack_symmetric`)."""
    return sum(e * (e - s) for s, e in _pack_blocks(n))


PACK_BLOCK = 256  # column-block width of packed factors: n x n keeps n²/2 + n·PACK_BLOCK/2 entries
STORAGES = ("fp32", "packed", "bf16")


def _pack_blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + PACK_BLOCK)) for s in range(0, n, PACK_BLOCK)]


def pack_symmetric(M: torch.Tensor) -> torch.Tensor:
    """The upper part of a symmetric (n, n) matrix as one flat tensor: for each column block [s, e), rows [0, e)
    (the diagonal block whole). About half the entries, exactly; :func:`unpack_symmetric` restores M. A flat
    tensor is taken as packed already."""
    if M.dim() == 1:
        return M
    return torch.cat([M[:e, s:e].reshape(-1) for s, e in _pack_blocks(M.shape[0])])


def unpack_symmetric(v: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, n) symmetric matrix :func:`pack_symmetric` packed into ``v``."""
    M = torch.empty(n, n, dtype=v.dtype, device=v.device)
    offset = 0
    for s, e in _pack_blocks(n):
        block = v[offset : offset + e * (e - s)].view(e, e - s)
        M[:e, s:e] = block
        M[s:e, :s] = block[:s].T
        offset += e * (e - s)
    return M


@dataclass
class KFACFactors:
    """Factors of every prunable linear: ``A[group]`` shared by an input group, ``G[name]`` per linear."""

    A: dict[str, torch.Tensor] = field(default_factory=dict)
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)  # linear name -> input-group key
    # first-order term: Σ_tokens g aᵀ / N per linear, (R, C') with the bias column last (collect_weight_grads)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    has_bias: dict[str, bool] = field(default_factory=dict)
    tokens: int = 0
    collect_inputs: bool = True  # off while sampled labels are drawn and while extra label samples reuse the inputs
    seconds: dict[str, float] = field(default_factory=dict)
    a_sizes: dict[str, int] = field(default_factory=dict)  # input-group key -> side of A (C, or C+1 with a bias)
    g_sizes: dict[str, int] = field(default_factory=dict)  # linear name -> side of G (R)
    recomputing: bool = False  # inside a checkpointed layer's backward-pass recomputation: the hooks stand aside

    def merge(self, other: "KFACFactors") -> None:
        """Take in the factors (and layout) of another set of layers from the same pass settings."""
        for mine, theirs in ((self.A, other.A), (self.G, other.G), (self.group_of, other.group_of),
                             (self.grads, other.grads), (self.has_bias, other.has_bias),
                             (self.a_sizes, other.a_sizes), (self.g_sizes, other.g_sizes)):
            mine.update(theirs)
        self.tokens = other.tokens

    def input_factor(self, name: str) -> torch.Tensor:
        """A of one linear as an fp32 matrix (whatever its storage), where the factor is kept."""
        return _full(self.A[self.group_of[name]], self.a_sizes[self.group_of[name]])

    def output_factor(self, name: str) -> torch.Tensor | None:
        """G of one linear as an fp32 matrix (None where none was collected)."""
        G = self.G.get(name)
        return None if G is None else _full(G, self.g_sizes[name])


def _full(M: torch.Tensor, n: int) -> torch.Tensor:
    return (unpack_symmetric(M, n) if M.dim() == 1 else M).float()


def _input_groups(model: nn.Module, adapter: ArchitectureAdapter, only=None
                  ) -> list[tuple[str, list[tuple[str, nn.Linear]]]]:
    """(input-group key, its linears) of every decoder layer, or of the layer indices in ``only``."""
    layers = get_submodule(model, adapter.layers)
    groups = []
    for i, layer in enumerate(layers):
        if only is not None and i not in only:
            continue
        for group in adapter.input_groups:
            members = [(f"{adapter.layers}.{i}.{n}", get_submodule(layer, n)) for n in group]
            groups.append((members[0][0], members))
    return groups


def _layer_factor_sizes(model: nn.Module, adapter: ArchitectureAdapter) -> list[int]:
    """Entries of every decoder layer's factors (the A of each input group with its bias column, the G of each
    linear): the weights of the balanced layer blocks."""
    sizes = []
    for layer in get_submodule(model, adapter.layers):
        total = sum((get_submodule(layer, group[0]).in_features + 1) ** 2 for group in adapter.input_groups)
        total += sum(get_submodule(layer, name).out_features ** 2 for name in adapter.linears)
        sizes.append(total)
    return sizes


def _balanced_blocks(sizes: list[int], k: int) -> list[list[int]]:
    """``k`` contiguous blocks of the indices of ``sizes`` (some possibly empty): index i goes to the block its
    running total falls in, in shares of sum(sizes) / k."""
    share = sum(sizes) / k
    blocks: list[list[int]] = [[] for _ in range(k)]
    acc = 0.0
    for i, size in enumerate(sizes):
        blocks[min(int(acc / share), k - 1) if share else 0].append(i)
        acc += size
    return blocks


def layer_blocks(model: nn.Module, adapter: ArchitectureAdapter, k: int) -> list[list[int]]:
    """At most ``k`` contiguous, non-empty blocks of decoder-layer indices, balanced by factor size."""
    return [b for b in _balanced_blocks(_layer_factor_sizes(model, adapter), k) if b]


def factor_memory(model: nn.Module, adapter: ArchitectureAdapter, *, world: int = 1, passes: int = 1,
                  shard: bool = False, storage: str = "fp32") -> dict[str, int]:
    """Bytes of K-FAC factors on the fullest rank of a data-parallel group of ``world`` (works on a meta-device
    model): ``stored``, what it keeps after the curvature pass (its own layers' factors with ``shard``, else all,
    kept as ``storage`` says, see :func:`estimate_kfac`), and ``peak``, the most alive during the pass (the factors
    kept from earlier layer blocks plus the current block's fp32 sums, which every rank accumulates; packed with
    ``storage="packed"``, as on a GPU, where each Gram is one matmul)."""
    def kept(n: int) -> int:  # bytes of one stored n x n factor
        if storage == "packed":
            return 4 * packed_size(n)
        return (2 if storage == "bf16" else 4) * n * n

    sum_bytes, stored_bytes = [], []
    for layer in get_submodule(model, adapter.layers):
        sides = [get_submodule(layer, g[0]).in_features + int(get_submodule(layer, g[0]).bias is not None)
                 for g in adapter.input_groups] + [get_submodule(layer, name).out_features for name in adapter.linears]
        sum_bytes.append(sum(4 * (packed_size(n) if storage == "packed" else n * n) for n in sides))
        stored_bytes.append(sum(kept(n) for n in sides))
    blocks = layer_blocks(model, adapter, passes)
    stored, peak = [0] * world, [0] * world
    for block in blocks:
        sums = sum(sum_bytes[i] for i in block)
        for r in range(world):
            peak[r] = max(peak[r], stored[r] + sums)
            stored[r] += sum(stored_bytes[i] for i in block if not shard or i % world == r)
    peak = [max(p, s) for p, s in zip(peak, stored)]
    return {"stored": max(stored), "peak": max(peak)}


def passes_to_fit(model: nn.Module, adapter: ArchitectureAdapter, budget: float, *, world: int = 1,
                  shard: bool = False, storage: str = "fp32") -> int | None:
    """The fewest layer-block passes whose :func:`factor_memory` peak is at most ``budget`` bytes (None: not even
    one decoder layer per pass fits)."""
    for passes in range(1, len(get_submodule(model, adapter.layers)) + 1):
        if factor_memory(model, adapter, world=world, passes=passes, shard=shard, storage=storage)["peak"] <= budget:
            return passes
    return None


def spread_devices(model: nn.Module, adapter: ArchitectureAdapter, devices: list[torch.device]
                   ) -> dict[str, torch.device]:
    """Factor placement over several devices: contiguous blocks of decoder layers, balanced by factor size.

    Maps every input-group key and linear name (the keys of ``KFACFactors.A`` and ``.G``) to the device that
    accumulates and stores its factor, so a model whose fp32 factors exceed one GPU (13B: ~125 GB) spreads them,
    and their Gram matmuls, over the GPUs of one machine.
    """
    blocks = _balanced_blocks(_layer_factor_sizes(model, adapter), len(devices))
    device_of = {i: devices[b] for b, block in enumerate(blocks) for i in block}
    placement = {}
    for i in device_of:
        for group in adapter.input_groups:
            placement[f"{adapter.layers}.{i}.{group[0]}"] = device_of[i]
        for name in adapter.linears:
            placement[f"{adapter.layers}.{i}.{name}"] = device_of[i]
    return placement


@contextmanager
def capture_kfac(model: nn.Module, adapter: ArchitectureAdapter, *, collect_A: bool = True,
                 collect_G: bool = True, device: torch.device | None = None,
                 gram_dtype: torch.dtype | None = None,
                 placement: dict[str, torch.device] | None = None,
                 layers=None, packed: bool = False) -> Iterator[KFACFactors]:
    """Register the hooks that accumulate A (forward) and G (output-gradient) sums; always removes them.

    The yielded factors hold *sums*, complete (symmetric) once the block exits; inside it only their upper
    triangles are (see :func:`accumulate_input_factor`). :func:`estimate_kfac` normalises them.
    ``gram_dtype``: see :func:`_gram`.
    ``placement`` (from :func:`spread_devices`) overrides ``device`` per factor key.
    ``layers``: the decoder-layer indices whose factors are collected (default: all).
    ``packed``: sums kept packed where the Gram is one matmul (:func:`accumulate_input_factor`).
    """
    stats = KFACFactors()
    handles = []

    def where(key: str) -> torch.device | None:
        return placement.get(key, device) if placement else device

    def on_forward(group_key: str, members, bias: bool):
        def hook(module, inputs, output):
            if collect_A and stats.collect_inputs and not stats.recomputing:
                A = stats.A.get(group_key)
                x = inputs[0].detach()
                dev = where(group_key)
                stats.A[group_key] = accumulate_input_factor(A, x.to(dev) if dev else x, bias=bias,
                                                             dtype=gram_dtype, upper_only=True, packed=packed)
            return None
        return hook

    def on_linear_forward(name: str):
        def hook(module, inputs, output):
            if collect_G and output.requires_grad and not stats.recomputing:
                def grad_hook(grad):
                    g = grad.detach()
                    dev = where(name)
                    stats.G[name] = accumulate_output_factor(stats.G.get(name), g.to(dev) if dev else g,
                                                             gram_dtype, upper_only=True, packed=packed)
                output.register_hook(grad_hook)
            return None
        return hook

    try:
        for group_key, members in _input_groups(model, adapter, layers):
            bias = members[0][1].bias is not None
            stats.a_sizes[group_key] = members[0][1].in_features + int(bias)
            handles.append(members[0][1].register_forward_hook(on_forward(group_key, members, bias)))
            for name, linear in members:
                stats.group_of[name] = group_key
                stats.has_bias[name] = linear.bias is not None
                stats.g_sizes[name] = linear.out_features
                handles.append(linear.register_forward_hook(on_linear_forward(name)))
        yield stats
        for sums, sides in ((stats.A, stats.a_sizes), (stats.G, stats.g_sizes)):  # the hooks summed upper parts only
            for key, M in sums.items():
                complete_sum_(M, sides[key])
    finally:
        for h in handles:
            h.remove()


@contextmanager
def checkpointed_layers(model: nn.Module, adapter: ArchitectureAdapter, stats: KFACFactors) -> Iterator[None]:
    """Run every decoder layer under non-reentrant activation checkpointing; ``stats.recomputing`` is set while a
    layer is recomputed in the backward pass (so the K-FAC hooks count each token once). Always restores the
    layers' ``forward``."""
    @contextmanager
    def recomputing():
        stats.recomputing = True
        try:
            yield
        finally:
            stats.recomputing = False

    def contexts():
        return nullcontext(), recomputing()

    layers = list(get_submodule(model, adapter.layers))
    own = [vars(layer).get("forward") for layer in layers]  # an instance-level forward (e.g. from accelerate), or None

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
        return checkpointed

    try:
        for layer in layers:
            layer.forward = wrap(layer.forward)
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = forward


def estimate_kfac(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    adapter: ArchitectureAdapter,
    fisher: str = "empirical",
    fisher_samples: int = 1,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    factor_device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    gram_dtype: torch.dtype | None = None,
    seed: int = 0,
    collect_gradients: bool = True,
    collect_weight_grads: bool = False,
    progress: Callable[[int, int], None] | None = None,
    process_group=None,
    checkpoint_layers: bool = False,
    passes: int = 1,
    owners: dict[str, int] | None = None,
    storage: str = "fp32",
) -> KFACFactors:
    """One forward+backward pass over the calibration ``windows`` (n, L) collecting K-FAC factors.

    ``fisher="empirical"`` uses the true next tokens; ``"sampled"`` draws ``fisher_samples`` label sets from
    the model's own softmax (the "true" Fisher) and averages G over them. ``collect_gradients=False`` runs
    forward passes only and collects A alone (L-OBD). ``gram_dtype`` (None = fp32) is the dtype of the factor
    matmuls (see :func:`_gram`); the sums are always fp32. Parameters get no gradients (only the
    embedding output is made to require grad), and the model's requires_grad flags are restored afterwards.

    Under torch.distributed (initialised, or ``process_group`` given) each rank processes its contiguous share
    of ``windows`` (every rank passes all of them) and the sums are all-reduced: all ranks return the same
    factors. Sampled labels are drawn per window from a generator seeded by (``seed``, window index), so they do
    not depend on the batch size nor on how the windows are shared out. ``progress`` counts this rank's windows.

    ``collect_weight_grads`` also returns the mean loss gradient of every prunable linear in ``factors.grads``
    (the first-order term): the weights are made to require grad for the pass, so autograd sums g aᵀ over tokens
    (one matmul per linear, the same as accumulating it in the hooks). It needs the true labels (empirical Fisher).

    ``checkpoint_layers`` trades a second forward pass per decoder layer for not keeping its activations during
    the backward pass (for batches whose activations would not fit); the factors are unchanged. ``passes``,
    ``owners`` (factor key -> rank) and ``storage``: see the module's "Memory" paragraph.
    """
    _check_arguments(fisher, collect_weight_grads, collect_gradients, passes, storage)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dp = distributed.resolve(process_group)
    factor_device, placement = _factor_placement(model, adapter, device, factor_device, dp)
    n_all, L = windows.shape
    mine = distributed.share(n_all, dp.rank, dp.world_size) if dp else slice(0, n_all)
    windows = windows[mine]
    k = fisher_samples if fisher == "sampled" else 1
    blocks = layer_blocks(model, adapter, passes) if passes > 1 else [None]
    packed = storage == "packed"
    capture = dict(collect_G=collect_gradients, device=factor_device, gram_dtype=gram_dtype, placement=placement,
                   packed=packed)
    calibrate = dict(device=device, batch_size=batch_size, fisher=fisher, k=k, seed=seed, first_window=mine.start,
                     autocast_dtype=autocast_dtype, collect_gradients=collect_gradients)
    factors = KFACFactors()
    seconds = {"curvature": 0.0, **({"allreduce": 0.0} if dp is not None else {})}
    with _calibration_mode(model, adapter, collect_weight_grads) as grad_params:
        for b, block in enumerate(blocks):
            t0 = time.perf_counter()
            with capture_kfac(model, adapter, layers=block, **capture) as stats, \
                    (checkpointed_layers(model, adapter, stats) if checkpoint_layers and collect_gradients
                     else nullcontext()):
                _calibration_pass(model, windows, stats, **calibrate,
                                  progress=(lambda i, total, b=b: progress(b * total + i, len(blocks) * total))
                                  if progress else None)
            tokens = windows.shape[0] * L
            _take_weight_grads(stats, grad_params, tokens, factor_device, keep=b == 0)
            if dp is not None:
                tokens = _reduce_stats(stats, tokens, dp, factor_device, collect_gradients, owners, packed, gram_dtype)
                seconds["allreduce"] += stats.seconds["allreduce"]
            _finish(stats, tokens, k, storage)
            factors.merge(stats)
            del stats
            seconds["curvature"] += time.perf_counter() - t0
    factors.seconds.update(seconds)
    return factors


def _check_arguments(fisher: str, collect_weight_grads: bool, collect_gradients: bool, passes: int,
                     storage: str) -> None:
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if collect_weight_grads and (fisher != "empirical" or not collect_gradients):
        raise ValueError("the first-order term needs the gradient of the true-label loss: use fisher='empirical'")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, not {storage!r}")


def _take_weight_grads(stats: KFACFactors, grad_params: dict, tokens: int, device, *, keep: bool) -> None:
    """Move the pass's mean weight gradients into ``stats`` (``keep``: the first pass; every pass computes the same
    ones) and clear the parameters' gradients for the next pass."""
    if keep:
        for name, g in _mean_weight_grads(grad_params, tokens):
            stats.grads[name] = g.to(device)
    for w, bias in grad_params.values():
        w.grad = None
        if bias is not None:
            bias.grad = None


def _finish(stats: KFACFactors, tokens: int, k: int, storage: str) -> None:
    """Sums -> means (A over tokens, G over tokens and label samples), kept as ``storage`` says."""
    stats.tokens = tokens
    for d, count in ((stats.A, tokens), (stats.G, tokens * k)):
        for key in list(d):
            d[key].div_(count)
            if storage == "packed":
                d[key] = pack_symmetric(d[key])
            elif storage == "bf16":
                d[key] = d[key].to(torch.bfloat16)


def _factor_placement(model, adapter, device: torch.device, factor_device, dp
                      ) -> tuple[torch.device | None, dict[str, torch.device] | None]:
    """(the device of the factors, or None with a per-factor placement over every visible GPU for "spread")."""
    if factor_device != "spread":
        return (torch.device(factor_device) if factor_device is not None else device), None
    if device.type != "cuda" or dp is not None:
        raise ValueError("factor_device='spread' needs CUDA and one process (it spreads one model's factors "
                         "over the GPUs of this machine)")
    return device, spread_devices(model, adapter, [torch.device("cuda", i) for i in range(torch.cuda.device_count())])


@contextmanager
def _calibration_mode(model: nn.Module, adapter: ArchitectureAdapter, weight_grads: bool
                      ) -> Iterator[dict[str, tuple[nn.Parameter, nn.Parameter | None]]]:
    """Eval mode, no parameter gradients (the embedding output requires grad, so the layers' outputs get
    gradients), or with ``weight_grads`` gradients of the prunable linears only (yielded); always restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    grad_params: dict[str, tuple[nn.Parameter, nn.Parameter | None]] = {}
    if weight_grads:
        for name, lin in prunable_linears(model, adapter).items():
            grad_params[name] = (lin.weight, lin.bias)
            for p in (lin.weight, lin.bias):
                if p is not None:
                    p.grad = None
                    p.requires_grad_(True)
    emb_handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        yield grad_params
    finally:
        emb_handle.remove()
        for w, b in grad_params.values():
            w.grad = None
            if b is not None:
                b.grad = None
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def _calibration_pass(model, windows, stats: KFACFactors, *, device, batch_size, fisher, k, seed, first_window,
                      autocast_dtype, collect_gradients, progress) -> None:
    """Forward (and backward) passes over ``windows`` in batches: the hooks of ``stats`` accumulate the sums."""
    n = windows.shape[0]
    # vocabulary-head chunk: a whole CPU batch at once (no recomputation in backward), smaller on accelerators
    head_chunk = 4096 if device.type == "cpu" else 1024
    autocast = dict(dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        if not collect_gradients:
            with torch.no_grad(), torch.autocast(device.type, **autocast):
                hidden_states(model, batch)
        else:
            generators = [_window_generator(seed, first_window + j) for j in range(i, i + batch.shape[0])] \
                if fisher == "sampled" else None
            for s in range(k):
                with torch.autocast(device.type, **autocast):
                    labels = None
                    if fisher == "sampled":  # the drawing pass adds nothing to A and builds no graph
                        stats.collect_inputs = False
                        with torch.no_grad():
                            labels = sample_labels(model, batch, generator=generators)
                    stats.collect_inputs = s == 0  # A once per batch, from the loss pass
                    loss = sequence_nll(model, batch, labels=labels, chunk_tokens=head_chunk).sum()
                loss.backward()
        if progress is not None:
            progress(min(i + batch_size, n), n)


def _mean_weight_grads(grad_params: dict, tokens: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, summed loss gradient / ``tokens``) of each prunable linear, (R, C') with the bias column last; one at a
    time, so the caller can move each away before the next is made."""
    for name, (w, b) in grad_params.items():
        g = w.grad.float() if w.grad is not None else torch.zeros(w.shape, device=w.device)
        if b is not None:
            gb = b.grad.float() if b.grad is not None else torch.zeros(b.shape, device=b.device)
            g = torch.cat([g, gb[:, None]], dim=1)
        yield name, g / tokens


def _window_generator(seed: int, index: int) -> torch.Generator:
    """The label-sampling generator of calibration window ``index`` (independent of batching and ranks)."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + index) % (2**63))


def _reduce_stats(stats: KFACFactors, tokens: int, dp: distributed.DataParallel, device: torch.device,
                  collect_gradients: bool, owners: dict[str, int] | None, packed: bool,
                  gram_dtype: torch.dtype | None) -> int:
    """SUM this rank's factor sums over the ranks: onto every rank, or with ``owners`` onto each factor's owner
    alone (the others drop it); the mean weight gradients, if any, onto every rank. ``packed``: the sums whose Gram
    is one matmul are packed (the same keys on every rank). Returns the total token count."""
    t0 = time.perf_counter()
    sizes = [(stats.A, stats.a_sizes)] + ([(stats.G, stats.g_sizes)] if collect_gradients else [])
    for sums, side in sizes:
        shapes = {key: (packed_size(d),) if _sum_is_packed(packed, device, gram_dtype, d) else (d, d)
                  for key, d in side.items()}
        reduced = (distributed.all_reduce_sums(sums, shapes, dp, device=device) if owners is None else
                   distributed.reduce_sums(sums, shapes, dp, device=device, owners=owners))
        sums.clear()
        sums.update(reduced)
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
    total = int(distributed.all_reduce_(count, dp).item())
    if getattr(stats, "grads", None):  # per-rank means over its own tokens -> one mean over all tokens
        sums = {k: g.mul_(tokens) if tokens else torch.zeros_like(g) for k, g in stats.grads.items()}
        stats.grads = {k: g.div_(total) for k, g in distributed.all_reduce_sums(
            sums, {k: tuple(g.shape) for k, g in sums.items()}, dp, device=device).items()}
    stats.seconds["allreduce"] = time.perf_counter() - t0
    return total


class NonFiniteCurvatureError(FloatingPointError):
    """Calibration produced NaN/Inf curvature factors (an overflow, typically under fp16/bf16 compute).

    Raised before any weight is changed, so the caller may rerun the shot in fp32 on the same model."""


class RoundedCurvatureError(NonFiniteCurvatureError):
    """Reduced-precision factor matmuls whose per-batch results were rounded (bf16 Gram on a CPU) left curvature
    factors that are not positive definite even with the configured damping. Raised before any weight is changed:
    rerun the shot with fp32 factor matmuls."""


def check_factors(factors: KFACFactors, compute_dtype: torch.dtype | None = None, *,
                  rounded_damping: tuple[float, float] | None = None) -> None:
    """Raise :class:`NonFiniteCurvatureError` if any K-FAC factor holds NaN/Inf.

    ``rounded_damping`` = (damping_a, damping_g), given when the factor matmuls rounded each batch's result to bf16
    (no fp32-output bf16 matmul on that device): then every damped factor must also be positive definite (a float64
    Cholesky), else :class:`RoundedCurvatureError`: rounded entries break the Gram matrices' positive
    semi-definiteness, which escalating damping would hide while the costs and updates go wrong."""
    tensors = [*factors.A.items(), *factors.G.items()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(M).all().to("cpu") for _, M in tensors])
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
        dtype = str(compute_dtype).replace("torch.", "") if compute_dtype is not None else "float32"
        raise NonFiniteCurvatureError(
            f"calibration overflow: curvature factors of {len(bad)} layer(s) hold NaN/Inf under {dtype} compute "
            f"(first: {bad[0]})")
    if rounded_damping is None:
        return
    bad = []
    for kind, group, sizes, frac in (("A", factors.A, factors.a_sizes, rounded_damping[0]),
                                     ("G", factors.G, factors.g_sizes, rounded_damping[1])):
        for name, M in group.items():
            if not is_positive_definite(_full(M, sizes[name]), frac):
                bad.append(f"{kind}[{name}]")
    if bad:
        raise RoundedCurvatureError(
            f"bf16 factor matmuls on {tensors[0][1].device.type} rounded each "
            f"batch's Gram matrix to bf16: {len(bad)} damped factor(s) are not positive definite (first: {bad[0]})")
