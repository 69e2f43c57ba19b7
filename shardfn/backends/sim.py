"""The simulated mesh: one thread per device, in-memory rendezvous, every fault an error.

Each shard_map call (and each backward of one) is a *run*: a fresh rendezvous state on the mesh's
persistent worker threads. Within a run every collective of a group is matched by its per-group
sequence number; when the last member arrives it checks that all members called the same thing
(name, axes, shape, dtype, arguments), computes every member's result in rank order (so runs are
bitwise reproducible) and wakes the others. A run ends with one error, and no thread left waiting,
when a device raises, when members disagree, when every device still running waits on something
that can never come (deadlock), or when a device does not arrive within the mesh's timeout.
"""
from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from collections import defaultdict, deque

import optree
import torch

from shardfn import context
from shardfn.errors import CollectiveMismatchError, DeadlockError, MeshTimeoutError, annotate

__all__ = ["SimRuntime"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_DIRS = (_PKG_DIR, os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.path.abspath(optree.__file__)))
_GRACE_S = 1.0


class _Aborted(BaseException):
    """Raised inside a device when its run has already failed elsewhere (never reaches users)."""


def _callsite() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_SKIP_DIRS) or "threading.py" in name):
            return f"{os.path.basename(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _fmt_sig(sig) -> str:
    name, axes, shape, dtype, extra = sig
    text = f"{name} over {axes} on {str(dtype).replace('torch.', '')}{list(shape)}"
    return text + (f" {extra}" if extra else "")


class _Slot:
    __slots__ = ("key", "members", "arrivals", "complete", "results", "cond")

    def __init__(self, key, members, lock):
        self.cond = threading.Condition(lock)
        self.key = key
        self.members = members
        self.arrivals = {}
        self.complete = False
        self.results = None


class _Run:
    """Rendezvous state of one dispatch over all devices of a mesh."""

    def __init__(self, runtime, check_vma, recorders):
        self.runtime = runtime
        self.mesh = runtime.mesh
        self.check_vma = check_vma
        self.recorders = recorders
        n = self.mesh.size
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # the dispatcher waits here
        self.error = None
        self.error_device = None
        self.slots = {}
        self.seq = [dict() for _ in range(n)]
        self.mail = defaultdict(deque)
        self.mail_cond = {}
        self.live = set(range(n))
        self.blocked = {}
        self.results = [None] * n
        self.done = 0
        self.gate = runtime.gate
        self.holding = [False] * n

    # ---- the run gate: at most `max_running` device threads compute at once -------------------
    def enter_gate(self, dev):
        if self.gate is not None and not self.holding[dev]:
            self.gate.acquire()
            self.holding[dev] = True

    def leave_gate(self, dev):
        if self.holding[dev]:
            self.holding[dev] = False
            self.gate.release()

    # ---- failure handling (lock held) ------------------------------------------------------
    def _abort(self, err, device=None):
        if self.error is None:
            self.error = err
            self.error_device = device
        for _, _, cond in self.blocked.values():
            cond.notify_all()
        self.cond.notify_all()

    def _check_deadlock(self):
        if not self.blocked or any(d not in self.blocked or self.blocked[d][1]() for d in self.live):
            return
        describe = self.mesh.describe
        lines = [f"  device {describe(d)} waits in {self.blocked[d][0]()}" for d in sorted(self.live)]
        finished = sorted(set(range(self.mesh.size)) - self.live)
        if finished:
            lines.append("  finished (will call nothing more): " + ", ".join(describe(d) for d in finished))
        self._abort(
            DeadlockError(
                "simulated mesh deadlock: every running device waits for a collective or message that "
                "no other device will issue. Devices must issue the same collectives over each group in "
                "the same order.\n" + "\n".join(lines)
            )
        )

    def _wait(self, dev, describe, progress, done, cond):
        """Block `dev` on `cond` until done(); progress() says whether it is no longer stuck."""
        self.blocked[dev] = (describe, progress, cond)
        self.leave_gate(dev)
        try:
            self._check_deadlock()
            deadline = time.monotonic() + self.mesh.timeout
            while not done():
                if self.error is not None:
                    raise _Aborted
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._abort(
                        MeshTimeoutError(
                            f"simulated mesh timeout: device {self.mesh.describe(dev)} waited "
                            f"{self.mesh.timeout:g} s in {describe()}. Raise make_mesh(timeout=...) if the "
                            f"devices are merely slow."
                        )
                    )
                    raise _Aborted
                cond.wait(remaining)
        finally:
            del self.blocked[dev]

    # ---- collectives -----------------------------------------------------------------------
    def collective(self, dev, axes, sig, compute):
        """Join the group of `dev` over `axes`; `compute(payloads)` makes every member's result."""
        key, members, pos = self.runtime.group(dev, axes)
        payload = sig[-1]
        sig = sig[:-1]
        site = _callsite()
        with self.cond:
            if self.error is not None:
                raise _Aborted
            seqs = self.seq[dev]
            step = seqs.get(key, 0)
            seqs[key] = step + 1
            slot = self.slots.get((key, step))
            if slot is None:
                slot = self.slots[(key, step)] = _Slot(key, members, self.lock)
            slot.arrivals[pos] = (sig, site, payload)
            if len(slot.arrivals) < len(members):

                def describe():
                    missing = [self.mesh.describe(m) for i, m in enumerate(members) if i not in slot.arrivals]
                    return f"{_fmt_sig(sig)} at {site}, for device(s) {', '.join(missing)}"

                self._wait(dev, describe, lambda: slot.complete, lambda: slot.results is not None, slot.cond)
                return slot.results[pos]
            slot.complete = True
            del self.slots[(key, step)]
            sigs = [slot.arrivals[i][0] for i in range(len(members))]
            if any(s != sigs[0] for s in sigs[1:]):
                calls = "\n".join(
                    f"  device {self.mesh.describe(m)}: {_fmt_sig(slot.arrivals[i][0])} at {slot.arrivals[i][1]}"
                    for i, m in enumerate(members)
                )
                self._abort(
                    CollectiveMismatchError(
                        f"simulated mesh: devices of one group issued different collectives at step {step} "
                        f"of group {key[0]}:\n{calls}\nEvery device of a group must issue the same "
                        f"collective with the same shape and dtype in the same order."
                    )
                )
                raise _Aborted
            payloads = [slot.arrivals[i][2] for i in range(len(members))]
        try:
            results = compute(payloads)
        except BaseException as err:
            with self.cond:
                self._abort(err, dev)
            raise _Aborted from None
        with self.cond:
            slot.results = results
            slot.cond.notify_all()
        return results[pos]

    def p2p(self, dev, axes, sends, recvs):
        """Post `sends` [(dst index, tensor)], then take `recvs` [(src index, shape, dtype)] in order."""
        key, members, pos = self.runtime.group(dev, axes)
        with self.cond:
            if self.error is not None:
                raise _Aborted
            for dst, tensor in sends:
                box_key = (key, pos, dst)
                self.mail[box_key].append(tensor.detach().clone())
                if box_key in self.mail_cond:
                    self.mail_cond[box_key].notify_all()
        out = []
        for src, shape, dtype in recvs:
            with self.cond:
                box = self.mail[(key, src, pos)]
                if not box:
                    site = _callsite()

                    def describe():
                        return (
                            f"recv of {str(dtype).replace('torch.', '')}{list(shape)} from device "
                            f"{self.mesh.describe(members[src])} over {key[0]} at {site}"
                        )

                    cond = self.mail_cond.setdefault((key, src, pos), threading.Condition(self.lock))
                    self._wait(dev, describe, lambda: bool(box), lambda: bool(box), cond)
                tensor = box.popleft()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                with self.cond:
                    self._abort(
                        CollectiveMismatchError(
                            f"simulated mesh: device {self.mesh.describe(dev)} expected "
                            f"{dtype}{list(shape)} from {self.mesh.describe(members[src])} but it sent "
                            f"{tensor.dtype}{list(tensor.shape)}."
                        )
                    )
                raise _Aborted
            out.append(tensor)
        return out

    # ---- device lifecycle ------------------------------------------------------------------
    def execute(self, dev, fn):
        ctx = context.DeviceContext(self.mesh, dev, SimComm(self, dev), check_vma=self.check_vma, recorders=self.recorders)
        try:
            self.enter_gate(dev)
            with context.use(ctx):
                result = fn(ctx)
        except _Aborted:
            pass
        except BaseException as err:  # noqa: BLE001 - reported to the caller with the device added
            with self.cond:
                self._abort(err, dev)
        else:
            self.results[dev] = result
        finally:
            self.leave_gate(dev)
            with self.cond:
                self.live.discard(dev)
                self.done += 1
                self._check_deadlock()
                if self.done == self.mesh.size:
                    self.cond.notify_all()  # the dispatcher waits for the last device (or an error)


class SimComm:
    """The communicator of one device within one run (see shardfn.backends for the contract)."""

    __slots__ = ("run", "dev")

    def __init__(self, run, dev):
        self.run = run
        self.dev = dev

    def _go(self, axes, sig, compute):
        out = self.run.collective(self.dev, axes, sig, compute)
        self.run.enter_gate(self.dev)
        return out

    def all_reduce(self, x, axes, op):
        def compute(payloads):
            acc = payloads[0].clone()
            for p in payloads[1:]:
                if op == "sum":
                    acc.add_(p)
                elif op == "max":
                    torch.maximum(acc, p, out=acc)
                else:
                    torch.minimum(acc, p, out=acc)
            return [acc] + [acc.clone() for _ in payloads[1:]]

        return self._go(axes, ("p" + op, axes, x.shape, x.dtype, "", x), compute)

    def all_gather(self, x, axes, dim):
        def compute(payloads):
            full = torch.cat(payloads, dim)
            return [full] + [full.clone() for _ in payloads[1:]]

        return self._go(axes, ("all_gather", axes, x.shape, x.dtype, f"dim={dim}", x), compute)

    def reduce_scatter(self, x, axes, dim):
        def compute(payloads):
            n = len(payloads)
            chunks = [p.chunk(n, dim) for p in payloads]
            out = []
            for i in range(n):
                acc = chunks[0][i].clone(memory_format=torch.contiguous_format)
                for c in chunks[1:]:
                    acc.add_(c[i])
                out.append(acc)
            return out

        return self._go(axes, ("psum_scatter", axes, x.shape, x.dtype, f"dim={dim}", x), compute)

    def all_to_all(self, x, axes, split_dim, concat_dim):
        def compute(payloads):
            n = len(payloads)
            chunks = [p.chunk(n, split_dim) for p in payloads]
            return [torch.cat([c[i] for c in chunks], concat_dim) for i in range(n)]

        extra = f"split_dim={split_dim} concat_dim={concat_dim}"
        return self._go(axes, ("all_to_all", axes, x.shape, x.dtype, extra, x), compute)

    def permute(self, x, axes, perm):
        def compute(payloads):
            out = [None] * len(payloads)
            for src, dst in perm:
                out[dst] = payloads[src].clone()
            return [o if o is not None else torch.zeros_like(payloads[i]) for i, o in enumerate(out)]

        return self._go(axes, ("ppermute", axes, x.shape, x.dtype, f"perm={list(perm)}", x), compute)

    def p2p(self, axes, sends, recvs, wait_sends=True):
        # every send is buffered in the run's mailboxes at once, so there is nothing to wait for
        out = self.run.p2p(self.dev, axes, sends, recvs)
        self.run.enter_gate(self.dev)
        return out


class _Worker:
    """One persistent device thread; replaced when a failed run leaves it stuck in user code."""

    def __init__(self, index, num_threads):
        self.jobs = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._loop, args=(num_threads,), name=f"shardfn-sim-device-{index}", daemon=True
        )
        self.thread.start()

    def _loop(self, num_threads):
        torch.set_num_threads(num_threads)
        while True:
            item = self.jobs.get()
            if item is None:
                return
            run, dev, fn = item
            run.execute(dev, fn)


class SimRuntime:
    """Runs per-device programs of one mesh on its worker threads."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._groups = {}
        self._inline = {}
        self._workers = None
        self._lock = threading.Lock()
        cores = os.cpu_count() or 1
        self.threads_per_device = max(1, cores // mesh.size)
        # Many more running device threads than cores cost more in switches than they gain (measured
        # on 2 cores, 8-device MLP step: 1 -> 183 ms, 2 -> 151, 4 -> 103, 8 -> 114); a device waiting
        # in a collective gives its place to another, so the gate cannot deadlock.
        self.gate = None
        self.max_running = 2 * cores

    @property
    def max_running(self) -> int:
        """How many device threads may compute at once (default: twice the machine's cores).

        Raise it to the mesh size for programs whose devices mostly sleep or wait on I/O (e.g.
        a pipeline benchmark with sleep-based stages), so that they overlap as real devices would.
        """
        return self._max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"SimRuntime.max_running must be a positive int; got {value!r}.")
        self._max_running = value
        self.gate = threading.Semaphore(value) if value < self.mesh.size else None

    def inline_context(self, check_vma):
        """The reusable device context of a 1-device mesh, whose programs run in the caller's thread."""
        ctx = self._inline.get(check_vma)
        if ctx is None:
            run = _Run(self, check_vma, None)
            ctx = self._inline[check_vma] = context.DeviceContext(
                self.mesh, 0, SimComm(run, 0), check_vma=check_vma, recorders=None
            )
        return ctx

    def group(self, dev, axes):
        """(group key, member device ranks in group order, position of `dev`) for `axes`."""
        found = self._groups.get((dev, axes))
        if found is None:
            mesh = self.mesh
            coords = mesh.coords_of(dev)
            key = (axes, tuple((a, coords[a]) for a in mesh.axis_names if a not in axes))
            members = []
            for idx in itertools.product(*(range(mesh.shape[a]) for a in axes)):
                c = dict(coords)
                c.update(zip(axes, idx))
                members.append(mesh.index_of(c))
            members = tuple(members)
            found = self._groups[(dev, axes)] = (key, members, members.index(dev))
        return found

    def run(self, fn, *, check_vma, recorders):
        """Call `fn(ctx)` on every device; return the per-device results or raise the run's error."""
        with self._lock:
            if self._workers is None:
                self._workers = [_Worker(i, self.threads_per_device) for i in range(self.mesh.size)]
            run = _Run(self, check_vma, recorders)
            n = self.mesh.size
            for dev, worker in enumerate(self._workers):
                worker.jobs.put((run, dev, fn))
            with run.cond:
                while run.done < n and run.error is None:
                    run.cond.wait()
                if run.error is not None:
                    deadline = time.monotonic() + _GRACE_S
                    while run.done < n and time.monotonic() < deadline:
                        run.cond.wait(max(0.0, deadline - time.monotonic()))
                    stuck = sorted(run.live)
                error, device = run.error, run.error_device
            if error is None:
                return run.results
            for dev in stuck:
                self._workers[dev].jobs.put(None)
                self._workers[dev] = _Worker(dev, self.threads_per_device)
        if device is not None:
            annotate(error, f"[raised on device {self.mesh.describe(device)} of {self.mesh!r}]")
        raise error
