"""Messages between pipeline ranks: pytrees of tensors, a shape header, receives in sender order.

The executor moves two kinds of message over the ``pp`` axis, both through
`shardfn.primitives.p2p` (sim: in-memory mailboxes; dist: ``batch_isend_irecv``):

- **activation** ``SEND_F(s, m)``: stage ``s``'s output pytree for microbatch ``m`` (every
  tensor leaf, in flatten order), optionally preceded by a header;
- **gradient** ``SEND_B(s, m)``: the gradients of stage ``s``'s input leaves that require
  grad (zeros for a leaf that got none, so both ends always agree on the message).

Header protocol (variable sequence lengths without the user stating shapes). A header is a
pickled ``(treespec, leaf metas)`` (a leaf meta is shape, dtype, requires_grad and the
varying mesh axes of a tensor, or the value of a non-tensor leaf), sent as an int64 length
then a uint8 buffer before the activation. With ``header="auto"`` it is sent only the first
time a stage sends an activation for microbatches of one *input signature* (the shapes and
dtypes of ``microbatches[m]``, which every rank sees); the receiver caches it under the same
key. Equal-shape microbatches therefore pay one header per stage boundary per run and
nothing per microbatch; ``m`` microbatches of ``k`` distinct shapes pay ``k``. This assumes a
stage's output shapes are a function of its input shapes; the sender checks that and raises
if a later microbatch with the same signature produced other shapes (pass ``header="always"``
for data-dependent shapes: one header per activation). Gradients never need a header: the
receiver owns the activation whose gradient comes back.

Ordering: messages between a pair of ranks arrive in the order they were sent (both backends,
and NCCL has no tags), but a rank may need them in another order (in a V placement rank 0
sends rank 1 both activations and gradients). Every rank knows every program, so a receiver
reads a peer's messages in that peer's send order and stashes the ones it does not need yet.

Sends never block (``p2p(..., wait_sends=False)``), as the schedules and the simulator assume:
on gloo a waited send completes only when the peer posts the receive, so two ranks that each
send before receiving would deadlock. `Mailbox.flush` waits for them at the end of the run.
"""

from __future__ import annotations

import pickle
from collections import deque

import torch

from shardfn.primitives.collectives import p2p
from shardfn.tree import flatten, unflatten
from shardfn.vma import set_vma, vma_of

from .actions import Kind
from .deps import peer_rank

__all__ = ["HEADER_MODES", "Mailbox", "incoming_messages", "input_signature", "leaf_metas"]

HEADER_MODES = ("auto", "always")


def input_signature(microbatch):
    """The key under which activation headers are cached: structure, shapes and dtypes of a microbatch."""
    leaves, treespec = flatten(microbatch)
    key = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append(("t", tuple(x.shape), x.dtype))
        else:
            try:
                hash(x)
                key.append(("v", x))
            except TypeError:
                key.append(("v", type(x).__name__))
    return treespec, tuple(key)


def leaf_metas(leaves, check_vma: bool):
    """Header entries of a flattened activation: tensors by meta, other leaves by value."""
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            axes = tuple(sorted(vma_of(x))) if check_vma else ()
            out.append(("t", tuple(x.shape), x.dtype, bool(x.requires_grad), axes))
        else:
            out.append(("v", x))
    return tuple(out)


def _describe(metas) -> str:
    return "[" + ", ".join(
        f"{str(m[2]).replace('torch.', '')}{list(m[1])}" if m[0] == "t" else repr(m[1]) for m in metas
    ) + "]"


class Mailbox:
    """Message state of one pipeline rank during one `run_pipeline` call.

    Args:
        schedule: the executed schedule (with communication actions).
        rank: this rank's index on the pipeline axis.
        incoming: `incoming_messages(schedule, rank)`.
        axis_name: the pipeline mesh axis.
        signatures: `input_signature` of every microbatch, ``[m]``.
        header: ``"auto"`` or ``"always"`` (see the module docstring).
        check_vma: whether received tensors get vma marks (shard_map's check_vma).
        own_output: ``own_output(stage, microbatch)`` -> the list of this rank's output leaves of
            that stage that require grad (the shapes of a gradient message it receives).
    """

    def __init__(self, schedule, rank, incoming, axis_name, signatures, header, check_vma, own_output):
        self.schedule = schedule
        self.rank = rank
        self.axis_name = axis_name
        self.signatures = signatures
        self.header = header
        self.check_vma = check_vma
        self.own_output = own_output
        self.incoming = {peer: deque(messages) for peer, messages in incoming.items()}
        self.stash = {}
        self.sent = {}  # (stage, signature) -> metas already announced
        self.known = {}  # (sender stage, signature) -> (treespec, metas) received

    # ---- sending ---------------------------------------------------------------------------
    def send_activation(self, stage, microbatch, tree):
        """Send stage ``stage``'s output pytree for ``microbatch`` to the rank of ``stage + 1``."""
        leaves, treespec = flatten(tree)
        metas = leaf_metas(leaves, self.check_vma)
        key = (stage, self.signatures[microbatch])
        tensors = []
        if self.header == "always" or key not in self.sent:
            # on the activation's device: NCCL moves device tensors only
            device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
            blob = torch.frombuffer(bytearray(pickle.dumps((treespec, metas))), dtype=torch.uint8).to(device)
            tensors += [torch.tensor([blob.numel()], dtype=torch.int64, device=device), blob]
            self.sent[key] = (treespec, metas)
        elif self.sent[key] != (treespec, metas):
            old_spec, old = self.sent[key]
            raise ValueError(
                f"run_pipeline: stage {stage} produced {_describe(metas)} for microbatch {microbatch}, but "
                f"{_describe(old)} for an earlier microbatch with the same input shapes"
                f"{' and another pytree structure' if old_spec != treespec else ''}. With header='auto' a "
                f"stage's output shapes, dtypes and requires_grad must follow from its input shapes; pass "
                f"header='always' for data-dependent shapes."
            )
        tensors += [x.detach() for x in leaves if isinstance(x, torch.Tensor)]
        self._send(stage + 1, tensors)

    def send_gradient(self, stage, grads):
        """Send the input gradients of ``stage`` (a list of tensors) to the rank of ``stage - 1``."""
        self._send(stage - 1, [g.detach() for g in grads])

    def _send(self, to_stage, tensors):
        if tensors:
            peer = self.schedule.stage_to_rank[to_stage]
            p2p(self.axis_name, [(peer, t) for t in tensors], (), wait_sends=False)

    def flush(self):
        """Wait until every message this rank sent has been delivered (dist keeps sends in flight)."""
        p2p(self.axis_name, (), (), wait_sends=True)

    # ---- receiving ---------------------------------------------------------------------------
    def receive(self, kind: Kind, stage: int, microbatch: int):
        """The message a ``RECV_F``/``RECV_B`` action of ``stage`` waits for.

        Returns:
            For RECV_F, the activation pytree (tensor leaves marked requires_grad as on the
            sender, and varying over the pipeline axis and the sender's axes). For RECV_B, the
            list of gradients of this rank's outputs of ``stage`` that require grad.
        """
        want = (Kind.SEND_F, stage - 1, microbatch) if kind is Kind.RECV_F else (Kind.SEND_B, stage + 1, microbatch)
        peer = self.schedule.stage_to_rank[want[1]]
        queue = self.incoming.get(peer, deque())
        while want not in self.stash:
            if not queue:
                raise RuntimeError(
                    f"run_pipeline: rank {self.rank} waits for {want[1]}{want[0].value}{microbatch} from rank {peer}, "
                    f"but rank {peer}'s program sends no such message to it; the schedule is not paired "
                    f"(run validate(schedule))."
                )
            message = queue.popleft()
            self.stash[message] = self._pull(peer, message)
        return self.stash.pop(want)

    def _recv(self, peer, specs):
        if not specs:
            return []
        return p2p(self.axis_name, (), [(peer, shape, dtype) for shape, dtype in specs], wait_sends=False)

    def _pull(self, peer, message):
        kind, stage, microbatch = message
        if kind is Kind.SEND_B:
            outputs = self.own_output(stage - 1, microbatch)
            return self._recv(peer, [(tuple(y.shape), y.dtype) for y in outputs])
        key = (stage, self.signatures[microbatch])
        if self.header == "always" or key not in self.known:
            (length,) = self._recv(peer, [((1,), torch.int64)])
            (blob,) = self._recv(peer, [((int(length[0]),), torch.uint8)])
            self.known[key] = pickle.loads(blob.cpu().numpy().tobytes())
        treespec, metas = self.known[key]
        tensors = iter(self._recv(peer, [(m[1], m[2]) for m in metas if m[0] == "t"]))
        leaves = []
        for meta in metas:
            if meta[0] == "v":
                leaves.append(meta[1])
                continue
            x = next(tensors)
            if meta[3]:
                x.requires_grad_(True)
            if self.check_vma:
                set_vma(x, frozenset(meta[4]) | {self.axis_name})
            leaves.append(x)
        return unflatten(treespec, leaves)


def incoming_messages(schedule, rank) -> dict:
    """For each peer, the messages ``(kind, stage, microbatch)`` it sends to ``rank``, in its program order."""
    out = {}
    for peer, program in enumerate(schedule.programs):
        for action in program:
            if action.kind in (Kind.SEND_F, Kind.SEND_B) and peer_rank(action, schedule) == rank:
                out.setdefault(peer, []).append((action.kind, action.stage, action.microbatch))
    return {peer: tuple(messages) for peer, messages in out.items()}
