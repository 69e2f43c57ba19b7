"""run_pipeline messages: pytrees of mixed tensors, variable lengths, the header protocol,
unaligned partitions and noop layers (FEATURES.md 3, 5, 38, 50, 51), against the sequential
float64 reference; bitwise (E0) for schedules that accumulate in microbatch order.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn import P, shard_map
from shardfn.debug import count_comms
from shardfn.schedules import (
    dualpipev,
    interleaved_1f1b,
    one_f_one_b,
    partition_layers,
    zbv,
    zero_bubble_h1,
)
from shardfn.schedules.executor import run_pipeline
from shardfn.schedules.stages import apply_layers, stack_layers, stack_stages, unstack_layers, unstack_stages
from shardfn.testing import cached_mesh

H, V, B = 3, 5, 2  # hidden, embedding rows, batch


# ---- a multi-parameter stage: several tensors of different shapes and dtypes per message --------
def multi_stage(w, x):
    """x: {"h": f64 [B, n, H] (grad), "aux": f32 [k] (grad), "ids": i64 [B], "pos": f64 [n] (no grad),
    "free": f64 [H] (a tensor the next stage ignores: its gradient comes back as zeros)}."""
    h = x["h"] + x["pos"][None, :, None]
    h = torch.tanh(h @ w["a"] + w["e"][x["ids"]][:, None, :]).cumsum(dim=1) / h.shape[1]
    h = h * (1 + x["aux"].to(torch.float64).mean())
    return {"h": h, "aux": x["aux"] * w["c"], "ids": (x["ids"] + 1) % V, "pos": x["pos"] * 0.5, "free": w["b"] * 2}


def multi_loss(y, mb):
    return (y["h"] - mb["t"]).square().mean() + y["aux"].to(torch.float64).square().mean() * 0.25


def multi_params(num_stages, gen):
    return [
        {
            "a": torch.randn(H, H, generator=gen, dtype=torch.float64),
            "b": torch.randn(H, generator=gen, dtype=torch.float64),
            "c": torch.randn((), generator=gen, dtype=torch.float32),
            "e": torch.randn(V, H, generator=gen, dtype=torch.float64),
        }
        for _ in range(num_stages)
    ]


def multi_microbatches(lengths, gen):
    out = []
    for n, k in lengths:
        out.append({
            "h": torch.randn(B, n, H, generator=gen, dtype=torch.float64),
            "aux": torch.randn(k, generator=gen, dtype=torch.float32),
            "ids": torch.randint(0, V, (B,), generator=gen),
            "pos": torch.arange(n, dtype=torch.float64) / n,
            "free": torch.zeros(H, dtype=torch.float64),
            "t": torch.randn(B, n, H, generator=gen, dtype=torch.float64),
        })
    return out


def reference(stage, loss, params, mbs):
    leaves = [{k: t.clone().requires_grad_(True) for k, t in w.items()} for w in params]
    total = 0
    for mb in mbs:
        x = {k: v for k, v in mb.items() if k != "t"}
        for w in leaves:
            x = stage(w, x)
        scaled = loss(x, mb) / len(mbs)
        scaled.backward()
        total = total + scaled.detach()
    grads = [{k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in w.items()} for w in leaves]
    return total, grads


def run(schedule, stage, loss, params, mbs, *, header="auto"):
    p = schedule.num_ranks

    def stage_fn(w, chunk, x):
        return stage({k: t[0, chunk] for k, t in w.items()}, {k: v for k, v in x.items() if k != "t"})

    def body(w, mbs):
        return run_pipeline(schedule, stage_fn, w, mbs, loss, header=header)

    loss_value, grads = shard_map(body, mesh=cached_mesh((p,), ("pp",)), in_specs=(P("pp"), P()),
                                  out_specs=(P(), P("pp")))(stack_stages(params, p, schedule.placement), mbs)
    return loss_value, unstack_stages(grads, schedule.placement)


def assert_bitwise(got, want):
    for s, (g, w) in enumerate(zip(got, want)):
        for k in w:
            assert g[k].dtype == w[k].dtype, f"stage {s} {k}: dtype {g[k].dtype} != {w[k].dtype}"
            assert torch.equal(g[k], w[k]), f"stage {s} {k}: not bitwise equal"


@pytest.mark.parametrize(
    "schedule",
    [one_f_one_b(2, 4), zero_bubble_h1(4, 5), interleaved_1f1b(2, 4, num_chunks=2), dualpipev(2, 4), zbv(2, 3)],
    ids=lambda s: s.name,
)
def test_multi_parameter_stages_with_variable_lengths_are_bitwise(schedule):
    gen = torch.Generator().manual_seed(schedule.num_microbatches)
    lengths = [(2 + i % 3, 1 + (i * 2) % 4) for i in range(schedule.num_microbatches)]  # (n_i, k_i) vary
    params = multi_params(schedule.num_stages, gen)
    mbs = multi_microbatches(lengths, gen)
    want_loss, want = reference(multi_stage, multi_loss, params, mbs)
    loss, got = run(schedule, multi_stage, multi_loss, params, mbs)
    assert torch.equal(loss, want_loss)
    assert_bitwise(got, want)
    # "free" depends on b only and no stage reads it: its gradient came back as zeros
    assert all(not g["b"].any() for g in got) and all(g["a"].any() and g["e"].any() for g in got)


def _p2p_sends(log, device):
    return sum(1 for r in log.records if r.name == "p2p" and r.device == device)


def test_header_is_sent_once_per_input_signature():
    # Rank 0 of 1F1B on p=2 sends each activation as 5 tensors; a header adds 2 (length, bytes).
    gen = torch.Generator().manual_seed(0)
    params = multi_params(2, gen)
    cases = {
        "equal": [(3, 2)] * 6,  # one signature: one header for the whole run, none per microbatch
        "three": [(3, 2), (4, 2), (3, 2), (2, 1), (4, 2), (2, 1)],  # three signatures: three headers
    }
    expected_headers = {"equal": 1, "three": 3}
    for name, lengths in cases.items():
        mbs = multi_microbatches(lengths, gen)
        want_loss, want = reference(multi_stage, multi_loss, params, mbs)
        for header, headers in (("auto", expected_headers[name]), ("always", len(lengths))):
            with count_comms() as log:
                loss, got = run(one_f_one_b(2, 6), multi_stage, multi_loss, params, mbs, header=header)
            assert torch.equal(loss, want_loss)
            assert_bitwise(got, want)
            assert _p2p_sends(log, 0) == 5 * len(lengths) + 2 * headers, (name, header)
            # gradients need no header: h, aux and free require grad (ids and pos do not)
            assert _p2p_sends(log, 1) == 3 * len(lengths), (name, header)


def _truncating_stage(w, x):
    """A stage whose output length depends on data (x["keep"]), not on the input shapes."""
    keep = int(x["keep"])
    return {"h": torch.tanh(x["h"][:, :keep] @ w["a"]), "keep": x["keep"]}


def _truncating_loss(y, mb):
    return y["h"].square().mean()


def test_data_dependent_shapes_need_header_always():
    gen = torch.Generator().manual_seed(1)
    params = [{"a": torch.randn(H, H, generator=gen, dtype=torch.float64)} for _ in range(2)]
    mbs = [{"h": torch.randn(B, 4, H, generator=gen, dtype=torch.float64), "keep": torch.tensor(k)} for k in (4, 2, 3)]
    with pytest.raises(ValueError, match=r"stage 0 produced .*float64\[2, 2, 3\].* for microbatch 1, but "
                                         r".*float64\[2, 4, 3\].*header='always'"):
        run(one_f_one_b(2, 3), _truncating_stage, _truncating_loss, params, mbs)
    want_loss, want = reference(_truncating_stage, _truncating_loss, params, mbs)
    loss, got = run(one_f_one_b(2, 3), _truncating_stage, _truncating_loss, params, mbs, header="always")
    assert torch.equal(loss, want_loss)
    assert_bitwise(got, want)


# ---- unaligned partitions and noop layers ------------------------------------------------------
def layer_fn(w, x):
    return {"x": torch.tanh(x["x"] @ w["a"] + w["b"])}


def layered_reference(layers, mbs):
    leaves = [{k: t.clone().requires_grad_(True) for k, t in w.items()} for w in layers]
    total = 0
    for mb in mbs:
        x = {"x": mb["x"]}
        for w in leaves:  # the model without its noop layers
            x = layer_fn(w, x)
        scaled = (x["x"] - mb["t"]).square().mean() / len(mbs)
        scaled.backward()
        total = total + scaled.detach()
    return total, [{k: t.grad for k, t in w.items()} for w in leaves]


def run_layered(schedule, partition, layers, mbs):
    p = schedule.num_ranks

    def body(w, mbs):
        return run_pipeline(schedule, lambda w, c, x: apply_layers(layer_fn, w, c, x), w, mbs,
                            lambda y, mb: (y["x"] - mb["t"]).square().mean())

    stacked = stack_layers(layers, partition, p, schedule.placement)
    loss, grads = shard_map(body, mesh=cached_mesh((p,), ("pp",)), in_specs=(P("pp"), P()),
                            out_specs=(P(), P("pp")))(stacked, mbs)
    assert grads["real"] is None  # the mask is not a floating leaf
    return loss, unstack_layers(grads, partition, schedule.placement)


def _layered_case(schedule, layers_per_stage, noop, seed):
    num_layers = sum(layers_per_stage)
    partition = partition_layers(num_layers, schedule.num_stages, layers_per_stage=layers_per_stage,
                                 noop_layers=noop)
    gen = torch.Generator().manual_seed(seed)
    layers = [{"a": torch.randn(H, H, generator=gen, dtype=torch.float64) / 2,
               "b": torch.randn(H, generator=gen, dtype=torch.float64)}
              for _ in range(num_layers - len(set(noop)))]
    mbs = [{"x": torch.randn(B, H, generator=gen, dtype=torch.float64),
            "t": torch.randn(B, H, generator=gen, dtype=torch.float64)} for _ in range(schedule.num_microbatches)]
    want_loss, want = layered_reference(layers, mbs)
    loss, got = run_layered(schedule, partition, layers, mbs)
    assert torch.equal(loss, want_loss)
    assert_bitwise(got, want)


@pytest.mark.parametrize(
    "schedule, layers_per_stage, noop",
    [
        (one_f_one_b(4, 5), [0, 3, 1, 2], [2]),  # a zero-layer first stage, a noop layer inside stage 1
        (interleaved_1f1b(2, 4, num_chunks=2), [2, 0, 1, 3], [0, 5]),  # zero-layer chunk on rank 1
        (dualpipev(2, 3), [1, 2, 0, 2], [4]),  # V placement: the zero-layer stage is the V's turn back
        (one_f_one_b(2, 2), [2, 1], [0, 1]),  # stage 0 holds only noop layers
    ],
    ids=["1f1b-p4", "interleaved-p2", "dualpipev-p2", "noop-stage"],
)
def test_unaligned_partition_with_zero_layer_stage_and_noop_layers(schedule, layers_per_stage, noop):
    _layered_case(schedule, layers_per_stage, noop, seed=0)


def test_stack_layers_checks_the_layer_count():
    partition = partition_layers(4, 2, layers_per_stage=[1, 3], noop_layers=[1])
    layer = {"a": torch.zeros(H, H)}
    with pytest.raises(ValueError, match=r"got 4 layer pytrees but the partition has 3 real layers"):
        stack_layers([layer] * 4, partition, 2)


@settings(max_examples=8)
@given(data=st.data())
def test_random_unaligned_partitions_equal_the_model_without_noop_layers(data):
    kind = data.draw(st.sampled_from(["1f1b", "interleaved", "zbv"]))
    p = data.draw(st.sampled_from([2, 4]))
    if kind == "1f1b":
        schedule = one_f_one_b(p, data.draw(st.integers(1, 2 * p)))
    elif kind == "interleaved":
        schedule = interleaved_1f1b(p, p * data.draw(st.integers(1, 2)), num_chunks=2)
    else:
        schedule = zbv(p, data.draw(st.integers(1, 2 * p)))
    counts = data.draw(st.lists(st.integers(0, 3), min_size=schedule.num_stages, max_size=schedule.num_stages))
    counts[data.draw(st.integers(0, schedule.num_stages - 1))] = 0  # at least one zero-layer stage
    if sum(counts) == 0:
        counts[-1] = 1
    noop = data.draw(st.sets(st.integers(0, sum(counts) - 1), max_size=sum(counts) - 1))
    _layered_case(schedule, counts, sorted(noop), seed=data.draw(st.integers(0, 99)))
