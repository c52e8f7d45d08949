"""Coupled structures (FFN units, heads, kv groups): target size, whole-unit zeros, joint cost, allocation."""

import math

import pytest
import torch

from surgeon_core import PruneOptions, adapter_for
from surgeon_core.adapters import get_submodule
from surgeon_core.coupled import layer_units, multi_row_costs, select_units, unit_costs
from surgeon_core.methods import Structure
from tiny_models import prune, tiny_model, tiny_windows

pytestmark = pytest.mark.unit


def _check_whole_units(model):
    ad = adapter_for(model)
    nh, nkv, hd = ad.head_layout(model.config)
    for layer in get_submodule(model, ad.layers):
        ins = [get_submodule(layer, n).weight for n in ad.mlp_in]
        out = get_submodule(layer, ad.mlp_out).weight
        zero_rows = [w.abs().sum(1) == 0 for w in ins]
        zero_col = out.abs().sum(0) == 0
        for z in zero_rows:
            assert torch.equal(z, zero_col)  # gate row j zero <=> up row j zero <=> down col j zero
        q = get_submodule(layer, ad.attention_in[0]).weight.reshape(nh, hd, -1)
        o = get_submodule(layer, ad.attention_out).weight.reshape(-1, nh, hd)
        assert torch.equal(q.abs().sum((1, 2)) == 0, o.abs().sum((0, 2)) == 0)  # q rows of a head <=> o columns
        k = get_submodule(layer, ad.attention_in[1]).weight.reshape(nkv, hd, -1)
        heads_dead = (o.abs().sum((0, 2)) == 0).reshape(nkv, -1).all(1)
        assert torch.equal(k.abs().sum((1, 2)) == 0, heads_dead)  # kv rows gone <=> all its heads gone
        # no stray zeros outside whole units
        zero_w = sum(int((w == 0).sum()) for w in ins) + int((out == 0).sum())
        assert zero_w == int(zero_col.sum()) * (sum(w.shape[1] for w in ins) + out.shape[0])


@pytest.mark.parametrize("family", ["llama", "opt", "mistral"])
def test_coupled_reaches_target_in_whole_units(family, monkeypatch):
    import surgeon_core.coupled as coupled

    selections = []  # (unit costs, selected masks) of each shot's global selection
    original = coupled.select_units

    def spy(costs, *args, **kwargs):
        masks = original(costs, *args, **kwargs)
        selections.append(([c.clone() for c in costs], masks))
        return masks

    monkeypatch.setattr(coupled, "select_units", spy)
    model = tiny_model(family)
    reports = prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled"), target_size=0.7,
                    num_shots=2)
    assert abs(reports[-1].achieved_size - 0.7) < 0.01
    loss = reports[-1].estimated_loss
    assert math.isfinite(loss) and loss > 0  # the shot removed units with a positive joint cost
    assert len(selections) == 2
    costs, masks = selections[-1]  # the estimate is the summed finite cost of the units the last shot selected
    assert loss == pytest.approx(float(sum(c[m & torch.isfinite(c)].sum() for c, m in zip(costs, masks))))
    _check_whole_units(model)


def test_heads_and_kv_groups_removed_whole():
    model = tiny_model("llama")  # magnitude costs at a small target remove heads and kv groups too
    r = prune(model, None, options=PruneOptions(method="magnitude", structure="coupled"), target_size=0.25)
    assert r[-1].type_sizes["k_proj"] < 1 and r[-1].type_sizes["q_proj"] < 1
    _check_whole_units(model)


def test_structure_parse_and_config():
    assert Structure.parse("coupled").kind == "coupled"
    from surgeon.config import load_recipe

    assert load_recipe(None, [], model="x", structure="coupled").method.structure == "coupled"
    per_param = load_recipe(None, ["coupled_score=per_param"], model="x", structure="coupled")
    assert per_param.method.coupled_score == "per_param"
    assert per_param.config_hash() != load_recipe(None, [], model="x", structure="coupled").config_hash()
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match="invalid recipe value for 'method.coupled_score'.*'cost' or 'per_param'"):
        load_recipe(None, ["coupled_score=ratio"], model="x", structure="coupled")
    with pytest.raises(SurgeonError, match="method wanda does not support coupled pruning"):
        load_recipe(None, [], model="x", structure="coupled", method="wanda")


def test_joint_cost_identity_factors_is_half_squared_norm():
    model = tiny_model("opt")
    ad = adapter_for(model)
    layer = get_submodule(model, ad.layers)[0]
    fams, part_params = layer_units(layer, ad, ad.head_layout(model.config), 0)
    W, A, G, A_inv, G_inv = {}, {}, {}, {}, {}
    for n in ad.linears:
        lin = get_submodule(layer, n)
        W[n] = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
        A[n] = A_inv[n] = torch.eye(W[n].shape[1])
        G[n] = G_inv[n] = torch.eye(W[n].shape[0])
    for fam in fams:
        c = unit_costs(fam, W, A, G, A_inv, G_inv)
        ref = torch.zeros(c.shape, dtype=torch.float64)
        for name, axis, idx in fam.members:
            Wm = W[name] if axis == "rows" else W[name].T
            ref += 0.5 * Wm[idx].double().square().sum((1, 2))
        torch.testing.assert_close(c, ref)
    # exact parameter accounting: FFN unit 2*hidden (fc1 row + fc2 col); head incl. k, v rows 4*hidden*head_dim
    h = model.config.hidden_size
    assert part_params[(0, "ffn", 0)] == 2 * h
    hd = h // model.config.num_attention_heads
    assert part_params[(0, "head", 0)] + part_params[(0, "kv", 0)] == 4 * h * hd


def test_multi_row_cost_matches_obs_update_loss():
    from surgeon_core.update import obs_update_rows, quadratic_loss

    torch.manual_seed(0)
    W = torch.randn(6, 5)
    X = torch.randn(40, 5)
    A = X.T @ X / 40
    Y = torch.randn(40, 6)
    G = Y.T @ Y / 40
    R = torch.tensor([[1, 4]])
    c = multi_row_costs(W, A, torch.linalg.inv(G), R)
    dW = obs_update_rows(W, torch.linalg.inv(G), R[0]) - W
    torch.testing.assert_close(c.float()[0], quadratic_loss(dW, A, G), rtol=1e-4, atol=1e-5)


def test_select_units_budget_and_overlap():
    # one layer: 2 kv groups of 2 heads; heads cost 1 param part each, kv parts 1
    parts_h = [((0, "head", 0),), ((0, "head", 1),), ((0, "head", 2),), ((0, "head", 3),)]
    parts_kv = [((0, "kv", 0), (0, "head", 0), (0, "head", 1)), ((0, "kv", 1), (0, "head", 2), (0, "head", 3))]
    pp = {p: 10 for u in parts_h + parts_kv for p in u}
    costs = [torch.tensor([0.1, 0.2, 5.0, 6.0]), torch.tensor([0.5, 9.0])]
    m = select_units(costs, [parts_h, parts_kv], pp, 30)
    # heads 0, 1 (completing group 0 takes its kv part) = 30 params
    assert m[0].tolist() == [True, True, False, False] and m[1].tolist() == [True, False]
    dead = [torch.tensor([float("-inf"), 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])]
    m = select_units(dead, [parts_h, parts_kv], pp, 0)
    assert m[0].tolist() == [True, False, False, False]  # dead units always taken


def test_select_units_per_param_order():
    """By cost, ten cheap small FFN units go before one head; per parameter, the head (0.05 per parameter against
    0.1) goes first and costs half as much for the same 100 parameters."""
    parts_f = [((0, "ffn", u),) for u in range(10)]
    parts_h = [((0, "head", 0),)]
    pp = {**{p: 10 for u in parts_f for p in u}, (0, "head", 0): 100}
    costs = [torch.full((10,), 1.0), torch.tensor([5.0])]
    by_cost = select_units(costs, [parts_f, parts_h], pp, 100)
    assert by_cost[0].all() and not by_cost[1].any()
    per_param = select_units(costs, [parts_f, parts_h], pp, 100, score="per_param")
    assert not per_param[0].any() and per_param[1].all()
    dead = [torch.tensor([float("-inf")] + [1.0] * 9), torch.tensor([5.0])]
    assert select_units(dead, [parts_f, parts_h], pp, 0, score="per_param")[0][0]  # dead units still always taken
    with pytest.raises(ValueError, match="coupled score"):
        select_units(costs, [parts_f, parts_h], pp, 100, score="ratio")
    with pytest.raises(ValueError, match="coupled_score"):
        PruneOptions(structure="coupled", coupled_score="ratio")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_coupled_per_param_reaches_target_in_whole_units(family):
    model = tiny_model(family)
    reports = prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled", coupled_score="per_param"),
                    target_size=0.7, num_shots=2)
    assert abs(reports[-1].achieved_size - 0.7) < 0.01
    _check_whole_units(model)


def _coupled_weights(device: str, offload: bool, monkeypatch, moves: list | None = None) -> dict:
    """Prune a tiny llama with coupled structure. With ``moves``, spy on ``_LayerState.to`` (the offload move): a
    real device move gives new tensor objects, so (also on CPU) every ``Tensor.to`` inside it returns a copy; each
    call is recorded as (target device, the state's tensors before, its tensors after)."""
    import surgeon_core.coupled as coupled

    with monkeypatch.context() as mp:  # undone on return: a second call must wrap the real coupled_shot
        original = coupled.coupled_shot

        def shot(*args, **kwargs):
            kwargs["offload"] = "cpu" if offload else None
            return original(*args, **kwargs)

        mp.setattr(coupled, "coupled_shot", shot)
        if moves is not None:
            original_to = coupled._LayerState.to
            tensor_to = torch.Tensor.to

            def spy_to(self, dev):
                before = [t for d in (self.W, self.A_inv, self.G_inv) for t in d.values() if t is not None]
                with monkeypatch.context() as m:
                    m.setattr(torch.Tensor, "to", lambda t, *a, **k: tensor_to(t, *a, **k).clone())
                    original_to(self, dev)
                moves.append((torch.device(dev), before, {"W": dict(self.W), "A_inv": dict(self.A_inv),
                                                          "G_inv": dict(self.G_inv)}))

            mp.setattr(coupled._LayerState, "to", spy_to)
        model = tiny_model("llama", seed=3).to(device)
        prune(model, tiny_windows(2, 16), options=PruneOptions(structure="coupled", device=device), target_size=0.6)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _check_offload_moves(moves: list, n_layers: int, device: str) -> None:
    """Each shot moves every layer to the CPU (cost phase done) and then back (update phase); the moved state is on
    the target device, made of new tensors, and the input-factor inverse shared by q/k/v and by gate/up stays one
    tensor (moved once)."""
    ad = adapter_for(tiny_model("llama"))
    assert moves and len(moves) % (2 * n_layers) == 0
    for s in range(0, len(moves), 2 * n_layers):
        shot = [m[0].type for m in moves[s: s + 2 * n_layers]]
        assert shot == ["cpu"] * n_layers + [torch.device(device).type] * n_layers
    for dev, before, st in moves:
        tensors = [t for d in st.values() for t in d.values()]
        assert all(t.device.type == dev.type for t in tensors)
        assert not {id(t) for t in tensors} & {id(t) for t in before}  # new tensors (a move), none kept in place
        assert st["A_inv"] and st["G_inv"]
        for group in (ad.attention_in, ad.mlp_in):
            assert len({id(st["A_inv"][n]) for n in group}) == 1  # q/k/v (gate/up) share one A inverse
        assert len({id(st["G_inv"][n]) for n in ad.linears}) == len(ad.linears)  # G inverses stay separate


def _offload_changes_nothing(device: str, monkeypatch) -> None:
    """The same pruned weights with and without offloading, and every offload move checked."""
    a = _coupled_weights(device, False, monkeypatch)
    moves: list = []
    b = _coupled_weights(device, True, monkeypatch, moves)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _check_offload_moves(moves, tiny_model("llama").config.num_hidden_layers, device)


def test_offloading_inverses_between_phases_changes_nothing(monkeypatch):
    """Parking each layer's weights and inverses on the CPU between the cost and update phases (what a 7B model
    needs on one GPU) gives the same weights. On CPU the move is made real by copying in ``Tensor.to``: every layer
    is moved out and back each shot and the shared input-factor inverses stay shared."""
    _offload_changes_nothing("cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloading_inverses_to_cpu_from_cuda_changes_nothing(monkeypatch):
    """On CUDA the offload really moves each layer's state to the CPU and back, with the same pruned weights."""
    _offload_changes_nothing("cuda", monkeypatch)


def test_joint_costs_of_large_blocks_with_threads_match_one_at_a_time():
    """Blocks of 192 rows (a SmolLM2 kv group's query rows) batched, with 2 threads: the same costs as each block
    alone. torch.linalg.solve's batched CPU LU (torch 2.13, MKL, >1 thread) returned ±1e100 here."""
    g = torch.Generator().manual_seed(0)
    R, Cp, k, U = 576, 96, 192, 3
    X = torch.randn(R, R + 8, generator=g, dtype=torch.float64)
    G_inv = (X @ X.T / R + 0.1 * torch.eye(R, dtype=torch.float64)).float()
    Y = torch.randn(Cp, Cp + 8, generator=g, dtype=torch.float64)
    A = (Y @ Y.T / Cp).float()
    W = torch.randn(R, Cp, generator=g)
    groups = torch.arange(U * k).view(U, k)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batched = multi_row_costs(W, A, G_inv, groups)
    finally:
        torch.set_num_threads(old)
    for u in range(U):
        rows = groups[u]
        B = G_inv.double()[rows][:, rows]
        M = W[rows].double() @ A.double() @ W[rows].double().T
        alone = 0.5 * torch.trace(torch.linalg.inv(B) @ M)
        assert batched[u].item() == pytest.approx(alone.item(), rel=1e-9)
