"""shard_map: run a per-device program over a mesh, splitting and joining values by spec.

Semantics follow jax.shard_map. Specs are pytree prefixes of the arguments and of the result (a P
or None applies to everything below it); non-tensor leaves pass through unsplit. On the sim
backend the mapped function takes and returns global plain tensors and is itself an autograd
function: its forward runs every device's program on the mesh's threads and its backward runs
every device's local backward there too, so collectives issued by transposes meet correctly. On
the dist backend it takes plain tensors (the same global value on every rank) or DTensors and
returns DTensors.
"""
from __future__ import annotations

import functools

import torch

from shardfn import context, debug
from shardfn.mesh import Mesh, current_mesh
from shardfn.spec import P, check_spec, entry_axes, join_blocks, local_block, spec_axes
from shardfn.tree import broadcast_prefix, flatten, flatten_with_paths, format_path, unflatten
from shardfn.vma import VmaMode, install_function_hook, set_vma, vma_of

__all__ = ["shard_map"]


def _is_spec(x) -> bool:
    return isinstance(x, P)


def shard_map(f, *, mesh: Mesh | None = None, in_specs, out_specs, check_vma: bool = True):
    """Map a per-device program `f` over `mesh`.

    Args:
        f: the per-device program, a function of local values (pytrees of tensors).
        mesh: the mesh; None uses the mesh entered with `with mesh:`.
        in_specs: a pytree prefix of the argument tuple with P (or None = replicated) leaves.
        out_specs: a pytree prefix of f's result with P (or None) leaves. An output must not vary
            over an axis its spec leaves unnamed (checked when check_vma=True).
        check_vma: track varying mesh axes, insert pvary automatically and check out_specs.
            With False there is no tracking cost, `pvary` is placed by hand, and an output whose
            spec leaves an axis unnamed is taken from the device with index 0 on that axis.

    Returns:
        A function of global values with the same signature as `f`.

    Example:
        >>> mesh = make_mesh((2, 4), ("dp", "tp"), backend="sim")
        >>> def step(x, w):                        # x: [b/dp, h], w: [h, f/tp]
        ...     return psum((x @ w).sum(), ("dp", "tp"))
        >>> shard_map(step, mesh=mesh, in_specs=(P("dp"), P(None, "tp")), out_specs=P())(x, w)
    """
    if not callable(f):
        raise TypeError(f"shard_map: f must be callable; got {type(f).__name__}.")
    if not isinstance(check_vma, bool):
        raise TypeError(f"shard_map: check_vma must be a bool; got {check_vma!r}.")

    plans: dict = {}

    @functools.wraps(f)
    def mapped(*args):
        m = mesh if mesh is not None else current_mesh()
        if m is None:
            raise ValueError(
                "shard_map: no mesh. Pass mesh=make_mesh(...) or call the mapped function inside `with mesh:`."
            )
        if not isinstance(m, Mesh):
            raise TypeError(f"shard_map: mesh must be a shardfn Mesh (from make_mesh); got {type(m).__name__}.")
        leaves, treespec = flatten(args)
        key = (id(m), treespec, tuple(x.shape if isinstance(x, torch.Tensor) else type(x) for x in leaves))
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _Plan(f, m, args, in_specs, out_specs, check_vma)
        if m.size == 1 and m.backend == "sim":
            return plan.run_inline(args)
        call = _Call(plan, leaves, args)
        if m.backend == "sim":
            return call.run_sim()
        return call.run_dist()

    return mapped


def _check_spec_leaves(specs, paths, root):
    bad = [format_path(root, p) + f" = {s!r}" for p, s in zip(paths, specs) if s is not None and not isinstance(s, P)]
    if bad:
        raise TypeError(
            f"shard_map: every {root} leaf must be P(...) or None; got " + "; ".join(bad)
            + ". Write P('dp') rather than 'dp', and P() or None for replicated."
        )


class _Plan:
    """What does not change between calls with the same argument structure and shapes."""

    def __init__(self, f, mesh, args, in_specs, out_specs, check_vma):
        self.f = f
        self.mesh = mesh
        self.check_vma = check_vma
        self.out_specs = out_specs
        self.track = check_vma and mesh.size > 1
        self.inline_ctx = mesh.runtime.inline_context(False) if mesh.size == 1 and mesh.backend == "sim" else None
        if self.track:
            install_function_hook()
        spec_paths, spec_leaves, _ = flatten_with_paths(in_specs, is_leaf=_is_spec)
        _check_spec_leaves(spec_leaves, spec_paths, "in_specs")
        paths, leaves, self.treespec = flatten_with_paths(args)
        specs = broadcast_prefix(in_specs, args, is_leaf=_is_spec, what="in_specs")
        problems = []
        for path, leaf, spec in zip(paths, leaves, specs):
            where = format_path("in_specs", path)
            if isinstance(leaf, torch.Tensor):
                problems += check_spec(spec, tuple(leaf.shape), mesh, where)
            elif spec is not None and spec_axes(spec):
                problems.append(
                    f"{where} = {spec!r} splits a non-tensor argument ({type(leaf).__name__}); only tensors "
                    f"can be split. Use None for it."
                )
        if problems:
            raise ValueError("shard_map: bad in_specs:\n  " + "\n  ".join(problems))
        self.specs = specs
        self.paths = paths
        self.spec_axes = [spec_axes(sp) for sp in specs]
        self.tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.outs = {}

    def run_inline(self, args):
        """One device: run in the caller's thread; autograd flows through directly.

        No vma tracking inline: collectives must not tag values either (check_vma=False), or
        vma_of would see some axes (axis_index, all_gather) and not others (ops).
        """
        ctx = self.inline_ctx
        prev = context.swap(ctx)
        try:
            out = self.f(*args)
        finally:
            context.swap(prev)
        self.out_plan(out)
        return out

    def out_plan(self, out):
        """(paths, leaf specs, treespec) of an output structure, checked once per structure and shapes."""
        leaves, treespec = flatten(out)
        key = (treespec, tuple(x.shape if isinstance(x, torch.Tensor) else None for x in leaves))
        found = self.outs.get(key)
        if found is None:
            paths = flatten_with_paths(out)[0]
            spec_paths, spec_leaves, _ = flatten_with_paths(self.out_specs, is_leaf=_is_spec)
            _check_spec_leaves(spec_leaves, spec_paths, "out_specs")
            leaf_specs = broadcast_prefix(self.out_specs, out, is_leaf=_is_spec, what="out_specs")
            problems = []
            for path, leaf, spec in zip(paths, leaves, leaf_specs):
                if isinstance(leaf, torch.Tensor):
                    problems += check_spec(spec, tuple(leaf.shape), self.mesh, format_path("out_specs", path), allow_uneven=True)
            if problems:
                raise ValueError("shard_map: bad outputs:\n  " + "\n  ".join(problems))
            found = self.outs[key] = (paths, leaf_specs, treespec, [set(spec_axes(sp)) for sp in leaf_specs])
        return leaves, found


class _Call:
    """One call of a mapped function: its leaves and the per-device state between forward and backward."""

    def __init__(self, plan, leaves, args):
        self.plan = plan
        self.args = args
        self.f = plan.f
        self.mesh = plan.mesh
        self.check_vma = plan.check_vma
        self.treespec = plan.treespec
        self.specs = plan.specs
        self.tensor_pos = plan.tensor_pos
        self.leaves = leaves
        self.out_treespec = None
        self.out_leaf_specs = None

    # ---- per-device program --------------------------------------------------------------------
    def _local_args(self, ctx, grad):
        leaves = list(self.leaves)
        locals_ = []
        for i in self.tensor_pos:
            x, spec = leaves[i], self.specs[i]
            blk = local_block(x, spec, ctx.coords, self.mesh)
            if grad:
                blk = blk.detach().requires_grad_(x.requires_grad)
            elif self.mesh.backend == "sim" and blk is x:
                blk = x.detach()
            if self.plan.track:
                set_vma(blk, self.plan.spec_axes[i])
            leaves[i] = blk
            locals_.append(blk)
        return unflatten(self.treespec, leaves), locals_

    def _call_f(self, ctx, args):
        if not self.plan.track:
            return self.f(*args)
        with VmaMode(ctx):
            out = self.f(*args)
        return self._pvary_outputs(ctx, out)

    def _pvary_outputs(self, ctx, out):
        """pvary each output over the axes its out_spec names but it does not vary over.

        Such an output is copied into every block of those axes, so the transpose must sum the
        blocks' cotangents over them (JAX does the same); without this a replicated value
        returned under a split out_spec gets only its own block's gradient.
        """
        from shardfn.primitives.rules import _pvary_tensor

        try:
            leaves, (_, _, treespec, named) = self.plan.out_plan(out)
        except (TypeError, ValueError):
            return out  # raised again, with context, by _flatten_out in the calling thread
        changed = False
        for k, (leaf, axes) in enumerate(zip(leaves, named)):
            if axes and isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                missing = tuple(a for a in self.mesh.axis_names if a in axes and a not in vma_of(leaf))
                if missing:
                    leaves[k] = _pvary_tensor(leaf, missing, ctx)
                    changed = True
        return unflatten(treespec, leaves) if changed else out

    def _flatten_out(self, out):
        leaves, (paths, leaf_specs, treespec, named) = self.plan.out_plan(out)
        self.out_paths, self.out_leaf_specs, self.out_treespec, self._named = paths, leaf_specs, treespec, named
        return leaves

    def _check_outputs(self, leaves):
        if not self.plan.track:
            return
        problems = []
        for path, leaf, spec, named in zip(self.out_paths, leaves, self.out_leaf_specs, self._named):
            if not isinstance(leaf, torch.Tensor):
                continue
            for axis in sorted(vma_of(leaf) - named):
                problems.append(
                    f"output {format_path('out', path)} varies over mesh axis {axis!r}, but its spec {spec!r} "
                    f"does not name {axis!r}. Reduce it first (psum or pmean over {axis!r}), or name {axis!r} "
                    f"in the out_spec to keep the per-device values (e.g. P({axis!r}, ...)), or pass "
                    f"check_vma=False to take device 0's value."
                )
        if problems:
            raise ValueError("shard_map: bad outputs:\n  " + "\n  ".join(problems))

    def _join(self, per_device_leaves, coords):
        out = []
        for k, spec in enumerate(self.out_leaf_specs):
            first = per_device_leaves[0][k]
            if not isinstance(first, torch.Tensor):
                out.append(first)
                continue
            blocks = [leaves[k].detach() for leaves in per_device_leaves]
            out.append(join_blocks(blocks, coords, spec, self.mesh))
        return out

    # ---- sim backend ---------------------------------------------------------------------------
    def run_sim(self):
        tensors = [self.leaves[i] for i in self.tensor_pos]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if grad:
            flat = _SimShardMap.apply(self, *tensors)
        else:
            flat = self._sim_forward(grad=False)
        return self._rebuild(flat)

    def _rebuild(self, flat_tensors):
        it = iter(flat_tensors)
        leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in self._template]
        return unflatten(self.out_treespec, leaves)

    def _sim_forward(self, grad):
        def device(ctx):
            with torch.set_grad_enabled(grad):
                args, locals_ = self._local_args(ctx, grad)
                out = self._call_f(ctx, args)
            return locals_, out

        results = self.mesh.runtime.run(device, check_vma=self.check_vma, recorders=debug.active_logs())
        per_device = [self._flatten_out(out) for _, out in results]
        self._check_outputs(per_device[0])
        self._locals = [loc for loc, _ in results]
        self._outs = per_device
        self._template = per_device[0]
        coords = [self.mesh.coords_of(d) for d in range(self.mesh.size)]
        joined = self._join(per_device, coords)
        return [x for x in joined if isinstance(x, torch.Tensor)]

    def _sim_backward(self, grads):
        if self._locals is None:
            raise RuntimeError(
                "shard_map (sim backend): this call's backward already ran and freed the per-device "
                "graphs, so backward(retain_graph=True) twice through it is not supported. Call the "
                "mapped function again for a second backward pass."
            )
        tensor_out = [k for k, x in enumerate(self._template) if isinstance(x, torch.Tensor)]
        out_specs = [self.out_leaf_specs[k] for k in tensor_out]
        rg = [i for i in range(len(self.tensor_pos)) if self.leaves[self.tensor_pos[i]].requires_grad]
        # split inputs' gradients are assembled by the devices themselves, in parallel: the owner of
        # each block (index 0 on every axis its spec leaves unnamed) copies it into the global buffer
        buffers = {}
        for i in rg:
            pos = self.tensor_pos[i]
            if self.plan.spec_axes[pos]:
                x = self.leaves[pos]
                buffers[i] = torch.empty(x.shape, dtype=x.dtype, device=x.device)

        def device(ctx):
            outs = self._outs[ctx.index]
            pairs = []
            for j, k in enumerate(tensor_out):
                g, o = grads[j], outs[k]
                if g is None or not o.requires_grad:
                    continue
                pairs.append((o, local_block(g, out_specs[j], ctx.coords, self.mesh)))
            inputs = [self._locals[ctx.index][i] for i in rg]
            if not pairs or not inputs:
                got = [None] * len(inputs)
            else:
                with torch.enable_grad():
                    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
            for n, i in enumerate(rg):
                pos = self.tensor_pos[i]
                if i in buffers and all(ctx.coords[a] == 0 for a in self.mesh.axis_names if a not in self.plan.spec_axes[pos]):
                    block = local_block(buffers[i], self.specs[pos], ctx.coords, self.mesh)
                    if got[n] is None:
                        block.zero_()
                    else:
                        block.copy_(got[n])
            return got

        results = self.mesh.runtime.run(device, check_vma=self.check_vma, recorders=debug.active_logs())
        coords = [self.mesh.coords_of(d) for d in range(self.mesh.size)]
        in_grads = []
        slot = {i: n for n, i in enumerate(rg)}
        for i, pos in enumerate(self.tensor_pos):
            if i not in slot:
                in_grads.append(None)
                continue
            blocks = []
            for d in range(self.mesh.size):
                g = results[d][slot[i]]
                blocks.append(g if g is not None else torch.zeros_like(self._locals[d][i]))
            if self.plan.track:
                self._check_replicas(pos, blocks, coords)
            in_grads.append(buffers[i] if i in buffers else blocks[0])
        self._locals = self._outs = None
        return in_grads

    def _check_replicas(self, pos, blocks, coords):
        """Devices holding the same block of an input must agree on its gradient (vma makes them).

        A disagreement means a gradient escaped the vma rules (e.g. a value computed outside torch's
        ops): silently taking one device's value would be wrong, so it is an error.
        """
        axes = self.plan.spec_axes[pos]
        first = {}
        for d, (g, c) in enumerate(zip(blocks, coords)):
            key = tuple(c[a] for a in axes)
            if key not in first:
                first[key] = d
            elif not torch.equal(g, blocks[first[key]]):
                path = format_path("args", self.plan.paths[pos])
                replicated = [a for a in self.mesh.axis_names if a not in axes]
                raise RuntimeError(
                    f"shard_map: the gradient of {path} (replicated over {replicated}) differs between "
                    f"devices {self.mesh.describe(first[key])} and {self.mesh.describe(d)}, so the vma rules "
                    f"missed a use of it. Make every use of it go through torch ops or shardfn collectives, "
                    f"or mark it with pvary(x, {tuple(replicated)}) before it meets sharded values."
                )

    # ---- dist backend --------------------------------------------------------------------------
    def run_dist(self):
        from shardfn.backends.dist import from_local_output, to_local_input

        runtime = self.mesh.runtime
        ctx = context.DeviceContext(self.mesh, runtime.rank_index, runtime.comm, check_vma=self.check_vma, recorders=None)
        leaves = list(self.leaves)
        for i in self.tensor_pos:
            blk = to_local_input(leaves[i], self.specs[i], ctx)
            if self.plan.track:
                if blk is leaves[i]:
                    blk = blk.view_as(blk)
                set_vma(blk, self.plan.spec_axes[i])
            leaves[i] = blk
        with context.use(ctx):
            out = self._call_f(ctx, unflatten(self.treespec, leaves))
        out_leaves = self._flatten_out(out)
        self._check_outputs(out_leaves)
        joined = [
            from_local_output(x, spec, ctx) if isinstance(x, torch.Tensor) else x
            for x, spec in zip(out_leaves, self.out_leaf_specs)
        ]
        return unflatten(self.out_treespec, joined)


class _SimShardMap(torch.autograd.Function):
    """shard_map on the sim backend as one autograd node: per-device forwards and backwards on threads."""

    @staticmethod
    def forward(ctx, call, *tensors):
        ctx.call = call
        flat = call._sim_forward(grad=True)
        non_diff = [t for t in flat if not (t.is_floating_point() or t.is_complex())]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        return tuple(flat)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.call._sim_backward(grads))
