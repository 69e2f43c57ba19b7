"""run_pipeline on sim meshes: every generator equals the sequential single-device reference.

Reference (FEATURES.md 0.3): one process runs microbatches 0..m-1 through all stages in
order, backpropagates ``loss_i / m`` for each and accumulates into ``.grad``. Float64
throughout. Bitwise (E0) where every stage gets its weight gradients in microbatch order,
which the test derives from the schedule and asserts for GPipe, 1F1B, interleaved and
DualPipeV without dw_detach (FEATURES.md 1, 2, 52); otherwise rtol 1e-12 (the summation order
of deferred W differs; each deferred W itself is checked bitwise in a separate test).
Also: pp x dp and pp x tp meshes (collectives inside stages; the vma of activations crosses
the stage cut in the header), errors before any message moves, a stage raising mid-schedule.
"""

import pytest
import torch

from shardfn import P, axis_index, pmean, shard_map
from shardfn.debug import count_comms
from shardfn.schedules import (
    Kind,
    Schedule,
    dualpipev,
    gpipe,
    interleaved_1f1b,
    nanopipe,
    one_f_one_b,
    zbv,
    zero_bubble_h1,
)
from shardfn.schedules import sequential_reference
from shardfn.schedules.executor import run_pipeline
from shardfn.schedules.stages import stack_stages, unstack_stages
from shardfn.testing import cached_mesh

H = 3
RTOL, ATOL = 1e-12, 1e-14  # float64; only the order of the per-microbatch weight-gradient sums differs


def layer(w, x):
    return {"x": torch.tanh(x["x"] @ w["a"]) * w["b"] + 0.5 * x["x"]}


def loss_fn(y, mb):
    return (y["x"] - mb["t"]).square().mean() * mb["w"]


def make(num_stages, num_microbatches, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    params = [{"a": randn(H, H), "b": randn(H)} for _ in range(num_stages)]
    mbs = [{"x": randn(batch, H), "t": randn(batch, H), "w": torch.ones((), dtype=torch.float64)}
           for _ in range(num_microbatches)]
    return params, mbs


def reference(params, mbs):
    return sequential_reference(lambda w, _stage, x: layer(w, x), params, mbs, loss_fn)


def pipelined(schedule, params, mbs, mesh=None, *, batch_axis=None):
    p = schedule.num_ranks
    mesh = mesh or cached_mesh((p,), ("pp",))

    def stage_fn(w, chunk, x):
        return layer({k: t[0, chunk] for k, t in w.items()}, x)

    def body(w, mbs):
        loss, grads = run_pipeline(schedule, stage_fn, w, mbs, loss_fn)
        if batch_axis:
            loss, grads = pmean(loss, batch_axis), pmean(grads, batch_axis)
        return loss, grads

    mb_spec = P(batch_axis) if batch_axis else P()
    loss, grads = shard_map(body, mesh=mesh, in_specs=(P("pp"), [{"x": mb_spec, "t": mb_spec, "w": P()}] * len(mbs)),
                            out_specs=(P(), P("pp")))(stack_stages(params, p, schedule.placement), mbs)
    return loss, unstack_stages(grads, schedule.placement)


def weight_grads_in_order(schedule) -> bool:
    """Whether every stage's B/W actions run in increasing microbatch order (then E0 holds)."""
    seen = {}
    for program in schedule.programs:
        for action in program:
            for a in action.computes:
                if a.kind in (Kind.B, Kind.W):
                    if seen.get(a.stage, -1) > a.microbatch:
                        return False
                    seen[a.stage] = a.microbatch
    return True


def _cases():
    out = []
    for p in (2, 4):
        sizes = sorted({1, p, 2 * p, 3 * p + 1})
        for m in sizes:
            out += [("gpipe", gpipe(p, m)), ("1f1b", one_f_one_b(p, m)), ("zbh1", zero_bubble_h1(p, m)),
                    ("zbv", zbv(p, m))]
            if m % p == 0:
                out += [("interleaved", interleaved_1f1b(p, m, num_chunks=2)),
                        ("nanopipe", nanopipe(p, m, num_chunks=2))]
            if m >= 2 * p - 1:
                out += [("dualpipev", dualpipev(p, m)), ("dualpipev_dwdetach", dualpipev(p, m, dw_detach=True))]
    return [pytest.param(s, id=f"{name}-p{s.num_ranks}-m{s.num_microbatches}") for name, s in out]


E0_BY_FEATURES = ("gpipe", "1f1b", "interleaved2", "dualpipev")


@pytest.mark.parametrize("schedule", _cases())
def test_every_generator_equals_the_sequential_reference(schedule):
    params, mbs = make(schedule.num_stages, schedule.num_microbatches, seed=schedule.num_microbatches)
    want_loss, want = reference(params, mbs)
    loss, got = pipelined(schedule, params, mbs)
    assert loss.dtype == torch.float64 and torch.equal(loss, want_loss)
    exact = weight_grads_in_order(schedule)
    if schedule.name in E0_BY_FEATURES:
        assert exact, f"{schedule.name} should accumulate weight gradients in microbatch order (E0)"
    for s, (g, w) in enumerate(zip(got, want)):
        for k in w:
            if exact:
                assert torch.equal(g[k], w[k]), f"stage {s} {k}: not bitwise equal"
            else:
                torch.testing.assert_close(g[k], w[k], rtol=RTOL, atol=ATOL, msg=f"stage {s} {k}")


@pytest.mark.parametrize(
    "schedule",
    [nanopipe(4, 8, num_chunks=2), dualpipev(4, 8, dw_detach=True), zero_bubble_h1(4, 5), zbv(2, 4)],
    ids=lambda s: s.name,
)
def test_each_deferred_weight_gradient_is_bitwise_the_undeferred_one(schedule):
    # Only microbatch k carries loss (the others are weighted by an exact 0), so the accumulated
    # gradient is exactly microbatch k's dW whatever the order of the sum: it must equal bitwise the
    # reference's full backward of that microbatch (FEATURES.md 4.5).
    m = schedule.num_microbatches
    for k in (0, m // 2, m - 1):
        params, mbs = make(schedule.num_stages, m, seed=10 + k)
        for i, mb in enumerate(mbs):
            mb["w"] = torch.tensor(1.0 if i == k else 0.0, dtype=torch.float64)
        _, want = reference(params, mbs)
        _, got = pipelined(schedule, params, mbs)
        for s, (g, w) in enumerate(zip(got, want)):
            for name in w:
                assert torch.equal(g[name], w[name]), f"microbatch {k} stage {s} {name}"


@pytest.mark.parametrize(
    "schedule", [one_f_one_b(2, 4), interleaved_1f1b(2, 4, num_chunks=2), dualpipev(2, 3)], ids=lambda s: s.name
)
def test_pp_by_dp_mesh(schedule):
    # pp x dp = 2 x 2 (dp major): microbatches split over dp, loss and grads pmean'd over dp.
    mesh = cached_mesh((2, 2), ("dp", "pp"))
    params, mbs = make(schedule.num_stages, schedule.num_microbatches, seed=3, batch=4)
    want_loss, want = reference(params, mbs)
    loss, got = pipelined(schedule, params, mbs, mesh, batch_axis="dp")
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)  # dp mean of two half-batch means
    for g, w in zip(got, want):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=RTOL, atol=ATOL)


def _body(schedule, stage_fn=None, loss=loss_fn, axis_name="pp"):
    def default(w, chunk, x):
        return layer({k: t[0, chunk] for k, t in w.items()}, x)

    def body(w, mbs):
        return run_pipeline(schedule, stage_fn or default, w, mbs, loss, axis_name=axis_name)

    return body


def _run(body, params, mbs, placement="loop", p=2):
    mesh = cached_mesh((p,), ("pp",))
    return shard_map(body, mesh=mesh, in_specs=(P("pp"), P()), out_specs=(P(), P("pp")))(
        stack_stages(params, p, placement), mbs
    )


def test_errors_come_before_any_tensor_moves():
    params, mbs = make(2, 4, seed=0)
    cases = [
        (one_f_one_b(2, 3), {}, r"got 4 microbatches but schedule 1f1b runs num_microbatches=3"),
        (one_f_one_b(4, 4), {}, r"programs for 4 ranks but the pipeline axis 'pp' has size 2"),
        (one_f_one_b(2, 4), {"axis_name": "tp"}, r"axis_name='tp' is not a mesh axis"),
    ]
    for schedule, kwargs, message in cases:
        with count_comms() as log:
            with pytest.raises(ValueError, match=message):
                _run(_body(schedule, **kwargs), params, mbs)
        assert log.records == [], "no message may move before the arguments are checked"
    with pytest.raises(ValueError, match=r"header='sometimes' is not one of \('auto', 'always'\)"):
        _run(lambda w, mbs: run_pipeline(one_f_one_b(2, 4), layer, w, mbs, loss_fn, header="sometimes"), params, mbs)
    with pytest.raises(TypeError, match=r"microbatches must be a list or tuple of pytrees"):
        _run(lambda w, mbs: run_pipeline(one_f_one_b(2, 4), layer, w, {"all": mbs}, loss_fn), params, mbs)
    # a schedule that is not valid: stage 1 never runs the backward of microbatch 1
    programs = [list(p) for p in one_f_one_b(2, 2).programs]
    programs[1] = [a for a in programs[1] if not (a.kind is Kind.B and a.microbatch == 1)]
    broken = Schedule(programs, 2, 2, "loop", "broken")
    with count_comms() as log:
        with pytest.raises(ValueError, match=r"stage 1 microbatch 1 has B=0"):
            _run(_body(broken), params, mbs[:2])
    assert log.records == []


def test_a_stage_raising_mid_schedule_ends_the_run_with_rank_and_action():
    params, mbs = make(4, 8, seed=1)
    schedule = interleaved_1f1b(2, 8, num_chunks=2)  # stage 3 is chunk 1 on rank 1
    calls = []

    def stage_fn(w, chunk, x):
        if chunk == 1 and int(axis_index("pp")) == 1:
            calls.append(chunk)
            if len(calls) == 3:  # stage 3's forwards run in microbatch order: this is 3F2
                raise ArithmeticError("boom in stage 3")
        return layer({k: t[0, chunk] for k, t in w.items()}, x)

    with count_comms() as log:
        with pytest.raises(ArithmeticError, match=r"boom in stage 3 \[run_pipeline: pipeline rank 1, step \d+, "
                                                  r"action 3F2 \(stage 3, chunk 1, microbatch 2\)\]"):
            _run(_body(schedule, stage_fn), params, mbs)
    assert log.bytes_sent(0, name="p2p") > 0, "the error came mid-schedule, after messages moved"
    # the mesh is usable again: the failed run left no device waiting
    loss, _ = _run(_body(schedule), params, mbs)
    assert torch.equal(loss, reference(params, mbs)[0])


def test_loss_must_be_a_scalar():
    params, mbs = make(2, 2, seed=2)
    with pytest.raises(ValueError, match=r"loss_fn must return a 0-d floating tensor; got torch.float64 \[2, 3\]"):
        _run(_body(one_f_one_b(2, 2), loss=lambda y, mb: y["x"] - mb["t"]), params, mbs)


def test_outside_shard_map_is_a_clear_error():
    with pytest.raises(RuntimeError, match="runs only inside a function mapped by shard_map"):
        run_pipeline(one_f_one_b(2, 2), layer, {}, [{}, {}], loss_fn)


def test_schedule_with_explicit_comms_and_no_comms_agree():
    from shardfn.schedules import add_comms

    params, mbs = make(4, 4, seed=4)
    schedule = interleaved_1f1b(2, 4, num_chunks=2)
    a = _run(_body(schedule), params, mbs)
    b = _run(_body(add_comms(schedule)), params, mbs)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1].values(), b[1].values()))


def test_overlapped_pairs_run_forward_then_backward():
    # DualPipeV's F&B pairs: the executor runs the forward half, then the backward half.
    schedule = dualpipev(2, 4)
    assert any(a.kind is Kind.OVERLAP_F_B for prog in schedule.programs for a in prog)
    params, mbs = make(4, 4, seed=5)
    loss, grads = _run(_body(schedule), params, mbs, placement="v")
    want_loss, want = reference(params, mbs)
    assert torch.equal(loss, want_loss)
    for g, w in zip(unstack_stages(grads, "v"), want):
        assert all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.parametrize("schedule", [one_f_one_b(2, 3), interleaved_1f1b(2, 2, num_chunks=2)], ids=lambda s: s.name)
def test_pp_by_tp_mesh_with_collectives_inside_stages(schedule):
    # Column-parallel stages on pp x tp = 2 x 2: each tp rank holds half the output columns and
    # gathers them (invariant result). The next stage's input is invariant over tp and meets a
    # tp-varying weight, so its gradient is psum'd over tp inside that stage's backward (the vma
    # rule), which only works if the header carried the activation's vma across the stage cut.
    from shardfn import all_gather_invariant

    h = 4  # even, for the tp split of the columns
    gen = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    params = [{"a": randn(h, h), "b": randn(h)} for _ in range(schedule.num_stages)]
    mbs = [{"x": randn(2, h), "t": randn(2, h), "w": torch.ones((), dtype=torch.float64)}
           for _ in range(schedule.num_microbatches)]
    want_loss, want = reference(params, mbs)

    def stage_fn(w, chunk, x):
        z = torch.tanh(x["x"] @ w["a"][0, chunk])  # [b, h/tp]
        y = all_gather_invariant(z, "tp", dim=-1, tiled=True) * w["b"][0, chunk]  # [b, h]
        return {"x": y + 0.5 * x["x"]}

    def body(w, mbs):
        return run_pipeline(schedule, stage_fn, w, mbs, loss_fn)

    specs = {"a": P("pp", None, None, "tp"), "b": P("pp")}
    loss, grads = shard_map(body, mesh=cached_mesh((2, 2), ("pp", "tp")), in_specs=(specs, P()),
                            out_specs=(P(), specs))(stack_stages(params, 2, schedule.placement), mbs)
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
    for g, w in zip(unstack_stages(grads, schedule.placement), want):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("schedule", [one_f_one_b(2, 3), zbv(2, 2)], ids=lambda s: s.name)
def test_tp_varying_activations_cross_stages_with_their_vma(schedule):
    # Megatron's column -> row split across the stage cut: a stage ends column-parallel (its output
    # is this tp rank's column block, varying over tp) and the next begins row-parallel (block @
    # rows, psum over tp). The receiver must mark the block varying over tp (from the header);
    # marked invariant, the vma rule would psum its gradient over tp and double-count it.
    from shardfn import axis_index, psum

    h = 4
    gen = torch.Generator().manual_seed(8)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / 2

    params = [{"a": randn(h, h), "r": randn(h, h)} for _ in range(schedule.num_stages)]
    mbs = [{"x": randn(2, h), "t": randn(2, h)} for _ in range(schedule.num_microbatches)]

    def ref_stage(w, x, first):
        return torch.tanh((x if first else x @ w["r"]) @ w["a"])

    leaves = [{k: t.clone().requires_grad_(True) for k, t in w.items()} for w in params]
    want_loss = 0
    for mb in mbs:
        x = mb["x"]
        for s, w in enumerate(leaves):
            x = ref_stage(w, x, s == 0)
        scaled = (x - mb["t"]).square().mean() / len(mbs)
        scaled.backward()
        want_loss = want_loss + scaled.detach()
    want = [{k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in w.items()} for w in leaves]

    def stage_fn(w, chunk, x):
        v = x["x"]
        full = v if v.shape[-1] == h else psum(v @ w["r"][0, chunk], "tp")  # data, or a column block
        return {"x": torch.tanh(full @ w["a"][0, chunk])}  # [b, h/tp], varying over tp

    def tp_loss(y, mb):
        cols = mb["t"].shape[-1] // 2
        t = mb["t"][:, int(axis_index("tp")) * cols:][:, :cols]
        return psum((y["x"] - t).square().sum(), "tp") / mb["t"].numel()

    def body(w, mbs):
        return run_pipeline(schedule, stage_fn, w, mbs, tp_loss)

    specs = {"a": P("pp", None, None, "tp"), "r": P("pp", None, "tp", None)}
    loss, grads = shard_map(body, mesh=cached_mesh((2, 2), ("pp", "tp")), in_specs=(specs, P()),
                            out_specs=(P(), specs))(stack_stages(params, 2, schedule.placement), mbs)
    torch.testing.assert_close(loss, want_loss, rtol=RTOL, atol=ATOL)
    for s, (g, w) in enumerate(zip(unstack_stages(grads, schedule.placement), want)):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=RTOL, atol=ATOL, msg=f"stage {s} {k}")


def test_one_rank_pipeline_runs_inline():
    # pp=1 (a 1-device mesh runs in the caller's thread): the executor is plain gradient accumulation
    params, mbs = make(2, 3, seed=9)
    want_loss, want = reference(params, mbs)
    loss, got = pipelined(interleaved_1f1b(1, 3, num_chunks=2), params, mbs)
    assert torch.equal(loss, want_loss)
    for g, w in zip(got, want):
        assert all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.parametrize(
    "schedule", [one_f_one_b(4, 8), gpipe(2, 3), interleaved_1f1b(2, 4, num_chunks=2), zero_bubble_h1(4, 6)],
    ids=lambda s: s.name,
)
def test_live_activations_follow_the_simulator(schedule):
    # The executor holds a stage output from its F until its B (or W, after an I) and no longer:
    # counting live outputs with weak references gives the simulator's peak per rank (1F1B:
    # min(p - r, m)). The rank of the last stage is left out: its output is not kept (the loss is).
    import weakref

    from shardfn.schedules import simulate

    p, v = schedule.num_ranks, schedule.num_chunks
    live = {r: [] for r in range(p)}
    peak = {r: 0 for r in range(p)}

    def stage_fn(w, chunk, x):
        rank = int(axis_index("pp"))
        y = layer({k: t[0, chunk] for k, t in w.items()}, x)
        refs = [r for r in live[rank] if r() is not None]
        live[rank] = refs + [weakref.ref(y["x"])]
        peak[rank] = max(peak[rank], len(live[rank]))
        return y

    params, mbs = make(schedule.num_stages, schedule.num_microbatches, seed=11)
    _run(_body(schedule, stage_fn), params, mbs, placement=schedule.placement, p=p)
    want = simulate(schedule, weight_memory=1).peak_activations
    for r in range(p):
        if schedule.stage_to_rank[-1] != r:
            assert peak[r] == want[r] * v, (r, peak, want)
    if schedule.name == "1f1b":
        assert [peak[r] for r in range(p - 1)] == [min(p - r, schedule.num_microbatches) for r in range(p - 1)]
