"""`run_pipeline`: execute any schedule with real tensors on the pipeline axis of a mesh.

Each rank walks its program action by action. Before an action it asks the shared dependency
rule (`deps.ready`, the one `validate` and `simulate` use) what is missing: a missing event on
another rank is a message, which a RECV action receives (`p2p.Mailbox`); anything else means
the program cannot run. Every stage boundary is an autograd cut: a stage's inputs are fresh
leaves, its backward is ``torch.autograd.grad`` from its outputs with the output gradients
that came back from the next stage.

Backward kinds (FEATURES.md 0.2 M3, zero-bubble split):

- ``B``: one ``autograd.grad`` for the inputs and the weights together;
- ``I``: ``autograd.grad`` for the inputs only, keeping the graph (``retain_graph=True``);
- ``W``: ``autograd.grad`` for the weights from the same outputs and output gradients, which
  frees the graph. The weight gradient it computes is the one ``B`` would have computed,
  bitwise (same graph, same output gradients, same kernels).

Weight gradients accumulate per parameter leaf in the order the rank runs B/W actions. For
GPipe, 1F1B, interleaved, ZB-H1 and DualPipeV without dw_detach every stage gets them in
microbatch order 0..m-1, so the result is bitwise equal to the sequential reference
(FEATURES.md 0.3 class E0); NanoPipe and DualPipeV with dw_detach run some W after later
microbatches' B, which changes the summation order (E1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from shardfn import context
from shardfn.primitives.collectives import psum
from shardfn.tree import flatten, tree_map, unflatten
from shardfn.vma import set_vma, vma_of
from shardfn.errors import annotate

from .actions import Action, Kind
from .comms import add_comms
from .deps import producer_rank, provides, ready
from .p2p import HEADER_MODES, Mailbox, incoming_messages, input_signature
from .placement import rank_chunk_of_stage
from .schedule import Schedule
from .validate import validate

__all__ = ["run_pipeline"]


@functools.lru_cache(maxsize=64)
def _plan(schedule: Schedule):
    """The schedule as executed (with SEND/RECV), each rank's incoming message order, stage -> chunk."""
    validate(schedule)
    executed = schedule if schedule.has_comms else add_comms(schedule)
    incoming = tuple(incoming_messages(executed, r) for r in range(executed.num_ranks))
    chunks = tuple(
        rank_chunk_of_stage(s, executed.num_ranks, executed.placement)[1] for s in range(executed.num_stages)
    )
    return executed, incoming, chunks


def run_pipeline(
    schedule: Schedule,
    stage_fn: Callable,
    stage_params,
    microbatches: Sequence,
    loss_fn: Callable,
    *,
    axis_name: str = "pp",
    header: str = "auto",
):
    """Run one training step of a pipeline schedule on this rank; call it inside shard_map.

    Rank ``r`` of the ``axis_name`` axis runs ``schedule.programs[r]`` (SEND/RECV actions are
    added with `add_comms` when the schedule has none) with real tensors and returns the mean
    loss and the gradients of its own parameters. Other mesh axes (dp, tp, ...) are free: each
    pipeline group runs independently, and ``stage_fn`` may use collectives over them.

    Parameters (``stage_params``): this rank's local parameters, any pytree. ``stage_fn``
    receives all of them plus the chunk index and picks what its chunk uses; every floating
    leaf is differentiated. The usual layout is `stack_stages`: from ``S`` per-stage pytrees
    build leaves ``[p, v, ...]`` whose entry ``[r, c]`` is the stage that runs as chunk ``c`` on
    rank ``r`` (`stage_of_rank_chunk`, loop or V placement), pass them with ``in_specs=P(axis_name)``
    so that each rank holds ``[1, v, ...]``, and write ``stage_fn`` to use ``params[0, chunk]``.
    For models given as layers with an unaligned split or noop layers use `stack_layers` and
    `apply_layers` (built on `partition_layers`).

    Microbatches: a list or tuple of ``schedule.num_microbatches`` pytrees, the same on every
    rank of the pipeline axis (they may be split over dp). Stage 0 gets ``microbatches[i]`` as
    its input; the last stage calls ``loss_fn(output, microbatches[i])``, so targets can ride in
    the microbatch. Microbatches may have different shapes (variable sequence lengths): the
    receiver learns shapes from a header, sent once per stage boundary and input signature
    (see `shardfn.schedules.p2p`; equal shapes pay one header per boundary per call).

    Args:
        schedule: a valid `Schedule` for ``axis_size(axis_name)`` ranks, with or without
            communication actions.
        stage_fn: ``stage_fn(stage_params, chunk, x) -> y``, a pure function; ``chunk`` is the
            local chunk index (0 for one chunk per rank; for V placements chunk 0 is the stage on
            the way down, chunk 1 the way back). ``x`` and ``y`` are pytrees of tensors (several
            tensors of different shapes and dtypes are fine; leaves that do not require grad
            get no gradient message; non-tensor leaves travel in the header).
        stage_params: this rank's parameters (pytree; see above).
        microbatches: ``[m]`` pytrees (see above).
        loss_fn: ``loss_fn(y, microbatch) -> loss``, a 0-d floating tensor, on the last stage.
        axis_name: the pipeline mesh axis.
        header: ``"auto"`` (headers cached per input signature) or ``"always"`` (one header per
            activation, for stages whose output shapes depend on data).

    Returns:
        ``(loss, grads)``. ``loss``: a 0-d float64 tensor, the mean over microbatches of
        ``loss_fn`` (the sum of ``loss_i / m`` in microbatch order), the same on every rank of
        the pipeline axis (it still varies over dp if the microbatches do: pmean it).
        ``grads``: a pytree like ``stage_params`` with the gradient of the mean loss for every
        floating leaf (zeros where unused, the leaf's dtype) and None for other leaves. It is this
        rank's contribution, partial over the axes the microbatches are split over (its vma says
        which): reduce it once with pmean/psum over dp (cp ...) yourself, as Megatron reduces
        after the pipeline flush, and psum it over the pipeline axis for a parameter that several
        pipeline ranks share (tied embeddings). Inside, parameters are marked varying over those
        axes, so no gradient all-reduce runs per microbatch.

    Raises:
        ValueError: before any tensor moves, when the number of microbatches differs from the
            schedule's, the schedule is for another number of ranks than the axis size, the
            schedule is invalid, or the axis is not a mesh axis (TypeError for arguments of the
            wrong kind).
        Exception: whatever ``stage_fn`` or ``loss_fn`` raises, with the pipeline rank, program
            step and action (stage, chunk, microbatch) appended to its message. On the sim
            backend it ends the whole run: ranks waiting for a message from the failed rank stop
            waiting. On the dist backend only the failing process raises; its peers stop at the
            process group's timeout, or when torchrun ends them after the failing process exits.

    Example:
        >>> mesh = make_mesh((2,), ("pp",), backend="sim")
        >>> def step(params, mbs):                 # params: [1, 1, h, h] per rank
        ...     return run_pipeline(one_f_one_b(2, 4), lambda w, c, x: torch.tanh(x @ w[0, c]),
        ...                         params, mbs, lambda y, mb: y.square().mean())
        >>> loss, grads = shard_map(step, mesh=mesh, in_specs=(P("pp"), P()),
        ...                         out_specs=(P(), P("pp")))(stacked, [x0, x1, x2, x3])
    """
    ctx = context.require("run_pipeline")
    _check_arguments(ctx, schedule, stage_fn, microbatches, loss_fn, axis_name, header)
    executed, incoming, chunks = _plan(schedule)
    rank = ctx.coords[axis_name]
    with torch.enable_grad():
        runner = _RankRun(ctx, executed, incoming[rank], chunks, rank, axis_name, header,
                          stage_fn, stage_params, list(microbatches), loss_fn)
        runner.run()
        return runner.finish()


def _check_arguments(ctx, schedule, stage_fn, microbatches, loss_fn, axis_name, header):
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"run_pipeline: schedule must be a Schedule (e.g. one_f_one_b(p, m)); got {type(schedule).__name__}."
        )
    for name, fn in (("stage_fn", stage_fn), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise TypeError(f"run_pipeline: {name} must be callable; got {type(fn).__name__}.")
    if header not in HEADER_MODES:
        raise ValueError(f"run_pipeline: header={header!r} is not one of {HEADER_MODES}.")
    if not isinstance(axis_name, str):
        raise TypeError(f"run_pipeline: axis_name must be one mesh axis name (a str); got {axis_name!r}.")
    shape = ctx.mesh.shape
    if axis_name not in shape:
        raise ValueError(
            f"run_pipeline: axis_name={axis_name!r} is not a mesh axis (mesh axes: {tuple(shape)}). Pass "
            f"axis_name= the pipeline axis of the mesh."
        )
    if shape[axis_name] != schedule.num_ranks:
        raise ValueError(
            f"run_pipeline: schedule {schedule.name or '(unnamed)'} has programs for {schedule.num_ranks} ranks but "
            f"the pipeline axis {axis_name!r} has size {shape[axis_name]}. Build the schedule for "
            f"num_ranks={shape[axis_name]}."
        )
    if not isinstance(microbatches, (list, tuple)):
        raise TypeError(
            f"run_pipeline: microbatches must be a list or tuple of pytrees (one per microbatch); got "
            f"{type(microbatches).__name__}. Split a batch with list(torch.chunk(x, m))."
        )
    if len(microbatches) != schedule.num_microbatches:
        raise ValueError(
            f"run_pipeline: got {len(microbatches)} microbatches but schedule {schedule.name or '(unnamed)'} runs "
            f"num_microbatches={schedule.num_microbatches}. Pass that many, or build the schedule for "
            f"{len(microbatches)} (generators state what they allow, e.g. interleaved needs a multiple of "
            f"num_ranks and DualPipeV at least 2 * num_ranks - 1)."
        )


class _Forward:
    """What a forward leaves for its backward: input leaves needing grad, the output, its grad leaves."""

    __slots__ = ("inputs", "output", "outs")

    def __init__(self, inputs, output, outs):
        self.inputs = inputs  # input leaves that require grad, flatten order
        self.output = output  # the stage's output pytree (None on the last stage)
        self.outs = outs  # output leaves that require grad (last stage: [loss / m])


class _RankRun:
    """One rank's execution of its program within one `run_pipeline` call."""

    def __init__(self, ctx, schedule, incoming, chunks, rank, axis_name, header, stage_fn, stage_params,
                 microbatches, loss_fn):
        self.schedule = schedule
        self.chunks = chunks
        self.rank = rank
        self.axis_name = axis_name
        self.stage_fn = stage_fn
        self.loss_fn = loss_fn
        self.microbatches = microbatches
        self.last = schedule.num_stages - 1
        self.check_vma = ctx.check_vma
        # the axes the microbatches are split over (dp, cp, ...): the gradients stay partial over
        # them, as in Megatron (one reduction by the caller after the flush, not one per backward)
        self.batch_axes = frozenset().union(*(vma_of(t) for mb in microbatches for t in flatten(mb)[0]))
        leaves, self.param_spec = flatten(stage_params)
        self.param_leaves = leaves
        self.trainable = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
        live = list(leaves)
        for i in self.trainable:
            w = leaves[i].detach().requires_grad_(True)
            if self.check_vma:
                # Each rank's stage values are its own: without the pipeline axis in its vma a
                # parameter meeting an activation would be pvary'd and psum its gradient over pp
                # inside every backward. Likewise for the batch axes: the caller reduces once.
                set_vma(w, vma_of(leaves[i]) | {axis_name} | self.batch_axes)
            live[i] = w
        self.params = unflatten(self.param_spec, live)
        self.weights = [live[i] for i in self.trainable]
        self.grads = [None] * len(self.weights)
        self.forwards = {}  # (stage, mb) -> _Forward, until its B or I
        self.deferred = {}  # (stage, mb) -> (outs, output grads), between I and W
        self.received = {}  # (stage, mb) -> activation pytree from RECV_F
        self.out_grads = {}  # (stage, mb) -> output grads from RECV_B or from the next stage on this rank
        self.in_grads = {}  # (stage, mb) -> input grads waiting for SEND_B
        self.losses = {}  # mb -> loss / m (detached)
        self.done = set()
        self.mailbox = Mailbox(
            schedule, rank, incoming, axis_name, [input_signature(mb) for mb in microbatches], header,
            self.check_vma, lambda s, m: self.forwards[(s, m)].outs,
        )

    # ---- the program ---------------------------------------------------------------------------
    def run(self):
        schedule = self.schedule
        for step, action in enumerate(schedule.programs[self.rank]):
            missing = ready(action, self.done, schedule)
            local = [e for e in missing if producer_rank(e, schedule) == self.rank]
            if local or (missing and action.kind not in (Kind.RECV_F, Kind.RECV_B)):
                raise RuntimeError(
                    f"run_pipeline: rank {self.rank} step {step}: {action} needs {', '.join(map(repr, missing))}, "
                    f"which no earlier action of this rank or message provides; validate(schedule) rejects such "
                    f"a program."
                )
            try:
                self._execute(action)
            except Exception as err:
                where = f"run_pipeline: pipeline rank {self.rank}, step {step}, action {self._describe(action)}"
                raise annotate(err, f"[{where}]")
            self.done.update(missing)  # the message a RECV waited for has arrived
            self.done.update(provides(action))

    def _describe(self, action: Action) -> str:
        if action.kind is Kind.OVERLAP_F_B:
            return str(action)
        return f"{action} (stage {action.stage}, chunk {self.chunks[action.stage]}, microbatch {action.microbatch})"

    def _execute(self, action: Action):
        kind, s, m = action.kind, action.stage, action.microbatch
        if kind is Kind.OVERLAP_F_B:
            for sub in action.sub_actions:  # no overlap on one thread: the forward, then the backward
                self._execute(sub)
        elif kind is Kind.F:
            self._forward(s, m)
        elif kind is Kind.B:
            self._backward(s, m)
        elif kind is Kind.I:
            self._input_grad(s, m)
        elif kind is Kind.W:
            self._weight_grad(s, m)
        elif kind is Kind.SEND_F:
            self.mailbox.send_activation(s, m, self.forwards[(s, m)].output)
        elif kind is Kind.RECV_F:
            self.received[(s, m)] = self.mailbox.receive(kind, s, m)
        elif kind is Kind.SEND_B:
            self.mailbox.send_gradient(s, self.in_grads.pop((s, m)))
        else:  # RECV_B
            self.out_grads[(s, m)] = self.mailbox.receive(kind, s, m)

    def _on_this_rank(self, stage: int) -> bool:
        return self.schedule.stage_to_rank[stage] == self.rank

    # ---- compute -------------------------------------------------------------------------------
    def _forward(self, s, m):
        if s == 0:
            x = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, self.microbatches[m])
        elif self._on_this_rank(s - 1):  # the V's turn: the previous stage ran here, cut the graph
            x = tree_map(
                lambda t: t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t,
                self.forwards[(s - 1, m)].output,
            )
        else:
            x = self.received.pop((s, m))
        inputs = [t for t in flatten(x)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        y = self.stage_fn(self.params, self.chunks[s], x)
        if s == self.last:
            loss = self.loss_fn(y, self.microbatches[m])
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
                got = f"{loss.dtype} {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"run_pipeline: loss_fn must return a 0-d floating tensor; got {got}. Reduce it with .mean() "
                    f"or .sum()."
                )
            scaled = loss / len(self.microbatches)  # Megatron: each microbatch loss / m, grads accumulate
            self.losses[m] = scaled.detach()
            self.forwards[(s, m)] = _Forward(inputs, None, [scaled] if scaled.requires_grad else [])
        else:
            outs = [t for t in flatten(y)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            self.forwards[(s, m)] = _Forward(inputs, y, outs)

    def _output_grads(self, s, m, record):
        if s == self.last:
            return [None] * len(record.outs)  # d(loss/m)/d(loss/m) = 1, as .backward() seeds it
        if self._on_this_rank(s + 1):
            return self.in_grads.pop((s + 1, m))
        return self.out_grads.pop((s, m))

    @staticmethod
    def _grad(outs, inputs, out_grads, retain):
        if not outs or not inputs:
            return [None] * len(inputs)
        return list(torch.autograd.grad(outs, inputs, out_grads, retain_graph=retain, allow_unused=True))

    def _deliver_input_grads(self, s, m, inputs, grads):
        if s == 0:
            return
        # an input that got no gradient sends zeros, so both ends agree on the message
        self.in_grads[(s, m)] = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

    def _accumulate(self, grads):
        for k, g in enumerate(grads):
            if g is not None:
                self.grads[k] = g if self.grads[k] is None else self.grads[k] + g

    def _backward(self, s, m):
        record = self.forwards.pop((s, m))
        out_grads = self._output_grads(s, m, record)
        grads = self._grad(record.outs, record.inputs + self.weights, out_grads, retain=False)
        n = len(record.inputs)
        self._deliver_input_grads(s, m, record.inputs, grads[:n])
        self._accumulate(grads[n:])

    def _input_grad(self, s, m):
        record = self.forwards.pop((s, m))
        out_grads = self._output_grads(s, m, record)
        grads = self._grad(record.outs, record.inputs, out_grads, retain=True)
        self._deliver_input_grads(s, m, record.inputs, grads)
        self.deferred[(s, m)] = (record.outs, out_grads)

    def _weight_grad(self, s, m):
        outs, out_grads = self.deferred.pop((s, m))
        self._accumulate(self._grad(outs, self.weights, out_grads, retain=False))

    # ---- results -------------------------------------------------------------------------------
    def _device(self):
        for t in self.weights + [t for mb in self.microbatches for t in flatten(mb)[0]]:
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")

    def finish(self):
        self.mailbox.flush()
        axes = self.batch_axes | {self.axis_name}
        if self.schedule.stage_to_rank[self.last] == self.rank:
            total = self.losses[0]
            for m in range(1, len(self.microbatches)):
                total = total + self.losses[m]
            total = total.detach().to(torch.float64)
        else:
            total = torch.zeros((), dtype=torch.float64, device=self._device())
        if self.check_vma:
            set_vma(total, frozenset(axes))
        loss = psum(total, self.axis_name)  # the last stage's value, on every pipeline rank
        out = [None] * len(self.param_leaves)
        for k, i in enumerate(self.trainable):
            g = self.grads[k]
            g = torch.zeros_like(self.weights[k]) if g is None else g
            g = g.detach()
            if self.check_vma:
                set_vma(g, vma_of(self.weights[k]))
            out[i] = g
        return loss, unflatten(self.param_spec, out)
