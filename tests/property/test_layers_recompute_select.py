"""Full-recompute layer selection (FEATURES.md 22, 24, 25; M7): block and uniform methods, per-pp-rank
counts and the priority rule, against a brute-force enumeration; gradients bitwise equal to no recompute."""
import itertools

import attrs
import optree
import pytest
import torch

from shardfn.layers import LlamaConfig, RecomputePolicy, model

# (num_layers, ranks, chunks, layers_per_stage or None for the even split)
LAYOUTS = [
    (8, 1, 1, None),
    (8, 2, 1, None),
    (8, 2, 2, None),
    (12, 2, 3, None),
    (16, 4, 2, None),
    (7, 2, 1, [3, 4]),
    (9, 2, 2, [1, 3, 0, 5]),       # unaligned with an empty chunk (model order: chunk-major)
    (10, 3, 2, [2, 1, 4, 0, 2, 1]),
]


def _brute_stages(num_layers, ranks, chunks, counts, placement):
    """[(rank, chunk, [global layers])] by walking the stages in model order."""
    counts = counts or [num_layers // (ranks * chunks)] * (ranks * chunks)
    out, start = [], 0
    for s, c in enumerate(counts):
        chunk, r = s // ranks, s % ranks
        if placement == "v" and chunk % 2:
            r = ranks - 1 - r
        out.append((r, chunk, list(range(start, start + c))))
        start += c
    assert start == num_layers
    return out


def _brute(num_layers, ranks, chunks, counts, placement, method, per_pp_rank, n_full, n_light):
    """(full layers, light layers, checkpoint groups) enumerated directly."""
    stages = _brute_stages(num_layers, ranks, chunks, counts, placement)
    per = lambda v, r: v[r] if isinstance(v, (list, tuple)) else v  # noqa: E731
    full, light, groups = set(), set(), []
    if per_pp_rank:
        for r in range(ranks):
            mine = [(local, chunk, layer) for rr, chunk, ls in stages if rr == r for local, layer in enumerate(ls)]
            order = [layer for _, _, layer in sorted(mine)]
            nf, nl = per(n_full, r), per(n_light, r)
            full |= set(order[:nf])
            light |= set(order[nf:] if nl is None else order[nf:nf + nl])
    else:
        for r, _, ls in stages:
            nf, nl = per(n_full, r), per(n_light, r)
            if method == "uniform":
                if nf:
                    full |= set(ls)
                    continue
                nf = 0
            full |= set(ls[:nf])
            light |= set(ls[nf:] if nl is None else ls[nf:nf + nl])
    for r, _, ls in stages:
        size = per(n_full, r)
        if method == "uniform" and size:
            groups += [tuple(ls[k:k + size]) for k in range(0, len(ls), size)]
        else:
            groups += [(i,) for i in ls if i in full]
    return full, light, tuple(groups)


def _cases():
    for (num_layers, ranks, chunks, counts), placement in itertools.product(LAYOUTS, ["loop", "v"]):
        per_rank_counts = [tuple((k + r) % 4 for r in range(ranks)) for k in range(2)]
        for n_full in [0, 1, 2, 3, *per_rank_counts]:
            for method, per_pp_rank in [("block", False), ("block", True), ("uniform", False)]:
                for n_light in [None, 1]:
                    yield num_layers, ranks, chunks, counts, placement, method, per_pp_rank, n_full, n_light


def test_selection_matches_brute_force():
    checked = 0
    for case in _cases():
        num_layers, ranks, chunks, counts, placement, method, per_pp_rank, n_full, n_light = case
        light = method == "block"  # norm/activation combine with full recompute only with method block
        policy = RecomputePolicy(full_layers=n_full, light_layers=n_light, norm=light, activation=light, selective=True,
                                 method=method, per_pp_rank=per_pp_rank, num_ranks=ranks, num_chunks=chunks,
                                 layers_per_stage=counts, placement=placement)
        want_full, want_light, want_groups = _brute(*case)
        got = [policy.for_layer(i, num_layers) for i in range(num_layers)]
        assert {i for i, k in enumerate(got) if k.full} == want_full, case
        assert {i for i, k in enumerate(got) if k.selective} == want_light, case
        assert not any(k.full and (k.norm or k.selective or k.activation) for k in got), case  # one kind per layer
        assert policy.full_groups(num_layers) == want_groups, case
        assert sorted(itertools.chain(*want_groups)) == sorted(want_full), case
        checked += 1
    assert checked == len(LAYOUTS) * 2 * 6 * 3 * 2


@pytest.mark.parametrize("num_layers,ranks,chunks", [(8, 2, 2), (12, 2, 3), (16, 4, 2), (6, 1, 3)])
def test_priority_is_mindspeed_formula_for_even_chunks(num_layers, ranks, chunks):
    """priority = ((layer_number - 1) mod layers_per_chunk) * v + vpp_rank with 1-based layer_number."""
    per_chunk = num_layers // (ranks * chunks)
    on = RecomputePolicy(per_pp_rank=True, num_ranks=ranks, num_chunks=chunks)
    off = attrs.evolve(on, per_pp_rank=False)
    for layer_number in range(1, num_layers + 1):
        vpp_rank = (layer_number - 1) // (per_chunk * ranks)
        assert on.priority(layer_number - 1, num_layers) == ((layer_number - 1) % per_chunk) * chunks + vpp_rank
        assert off.priority(layer_number - 1, num_layers) == (layer_number - 1) % per_chunk


def test_hand_worked_examples():
    # L=8, p=2, v=2 (loop): rank 0 holds 0,1 (chunk 0) and 4,5 (chunk 1); rank 1 holds 2,3 and 6,7.
    per_rank = RecomputePolicy(full_layers=3, per_pp_rank=True, num_ranks=2, num_chunks=2)
    # priorities: layers 0,1 -> 0,2; 2,3 -> 0,2; 4,5 -> 1,3; 6,7 -> 1,3
    assert [i for i in range(8) if per_rank.for_layer(i, 8).full] == [0, 1, 2, 3, 4, 6]
    per_chunk = attrs.evolve(per_rank, full_layers=1, per_pp_rank=False)
    assert [i for i in range(8) if per_chunk.for_layer(i, 8).full] == [0, 2, 4, 6]
    uniform = RecomputePolicy(full_layers=3, method="uniform", num_ranks=2, layers_per_stage=[5, 3])
    assert uniform.full_groups(8) == ((0, 1, 2), (3, 4), (5, 6, 7))
    by_rank = RecomputePolicy(full_layers=(2, 0), num_ranks=2)
    assert [i for i in range(8) if by_rank.for_layer(i, 8).full] == [0, 1]


def test_single_stage_default_is_first_n_blocks():
    p = RecomputePolicy(full_layers=2, norm=True, light_layers=1)
    assert [p.for_layer(i).full for i in range(4)] == [p.for_layer(i, 4).full for i in range(4)] == [1, 1, 0, 0]
    assert p.full_groups(4) == ((0,), (1,))


@pytest.mark.parametrize("kwargs,match", [
    (dict(full_layers=(1, 2, 3), num_ranks=2), "one count per pipeline rank"),
    (dict(full_layers=-1), "int >= 0"),
    (dict(full_layers=2, method="uniform", per_pp_rank=True), "method='block' only"),
    (dict(full_layers=2, method="uniform", norm=True), "only with method='block'"),
    (dict(method="interleaved"), "method"),
    (dict(placement="zigzag"), "placement"),
])
def test_bad_policies_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecomputePolicy(**kwargs)


def test_pipeline_layout_needs_num_layers():
    with pytest.raises(ValueError, match="num_layers is required"):
        RecomputePolicy(full_layers=1, num_ranks=2).for_layer(0)
    with pytest.raises(ValueError, match="layers_per_stage"):
        RecomputePolicy(full_layers=1, num_ranks=2, layers_per_stage=[2, 2]).full_groups(5)


CONFIG = LlamaConfig(vocab_size=19, hidden=16, num_layers=5, num_heads=4, num_kv_heads=2, ffn_hidden=24,
                     attention_dropout=0.2, hidden_dropout=0.1, noop_layers=(2,), init_std=0.2, num_experts=3,
                     moe_top_k=2, moe_ffn_hidden=8, moe_aux_loss_coeff=0.05)

MODEL_POLICIES = {
    "uniform_2": RecomputePolicy(full_layers=2, method="uniform"),
    "uniform_3_unaligned_pp": RecomputePolicy(full_layers=3, method="uniform", num_ranks=2, layers_per_stage=[4, 1]),
    "block_1_vpp": RecomputePolicy(full_layers=1, num_ranks=2, num_chunks=2, layers_per_stage=[1, 2, 0, 2],
                                   norm=True, activation=True, light_layers=1),
    "block_per_pp_rank": RecomputePolicy(full_layers=(2, 1), per_pp_rank=True, num_ranks=2, num_chunks=2,
                                         layers_per_stage=[2, 1, 1, 1], selective=True),
}


def _loss_and_grads(policy):
    params = model.init(torch.Generator().manual_seed(0), CONFIG)
    leaves = optree.tree_leaves(params)
    for t in leaves:
        t.requires_grad_()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    loss = model.loss(params, tokens, tokens.roll(-1, 1), recompute=policy, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", sorted(MODEL_POLICIES))
def test_method_gradients_bitwise_equal_to_no_recompute(name):
    """Dropout on, MoE blocks with the aux loss in the loss, a noop block: every method is exact."""
    assert MODEL_POLICIES[name].full_groups(CONFIG.num_layers)  # something is really checkpointed
    loss0, g0 = _loss_and_grads(RecomputePolicy())
    loss1, g1 = _loss_and_grads(MODEL_POLICIES[name])
    assert torch.equal(loss0, loss1)
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_uniform_group_is_one_checkpoint():
    """A uniform group re-runs as a unit: only its input stays saved, so fewer bytes than per-block checkpoints."""
    from shardfn.memory import saved_activation_bytes

    params = model.init(torch.Generator().manual_seed(0), attrs.evolve(CONFIG, attention_dropout=0.0,
                                                                       hidden_dropout=0.0, noop_layers=()))
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    group = saved_activation_bytes(model.loss, params, tokens, tokens,
                                   recompute=RecomputePolicy(full_layers=5, method="uniform"))
    single = saved_activation_bytes(model.loss, params, tokens, tokens,
                                    recompute=RecomputePolicy(full_layers=5, method="block"))
    hidden_bytes = 2 * 6 * CONFIG.hidden * 4
    assert single - group == 4 * hidden_bytes  # the inputs of blocks 1..4 are no longer kept
