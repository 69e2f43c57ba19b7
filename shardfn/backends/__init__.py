"""Backends move bytes between devices: `sim` (threads in one process) and `dist` (torch.distributed).

Both expose the same per-device communicator, whose collectives are tiled and take the group as a
tuple of mesh axis names (major first; a device's index in the group is its mixed-radix index):

- ``all_reduce(x, axes, op)`` with op in {"sum", "max", "min"};
- ``all_gather(x, axes, dim)``: blocks concatenated along `dim` in group order;
- ``reduce_scatter(x, axes, dim)``: `x` cut into group-size chunks along `dim`, chunk i summed onto member i;
- ``all_to_all(x, axes, split_dim, concat_dim)``: chunk j of `split_dim` goes to member j, received
  chunks concatenated along `concat_dim` in source order;
- ``permute(x, axes, perm)``: (source, destination) group-index pairs; non-receivers get zeros;
- ``p2p(axes, sends, recvs, wait_sends)``: point-to-point messages for pipelines: `sends` is a list
  of (destination index, tensor), `recvs` a list of (source index, shape, dtype); returns the
  received tensors in order. Messages between one pair arrive in the order they were sent. With
  wait_sends=False the sends may still be in flight on return (a later call with True waits).

All inputs are local tensors without autograd; shardfn.primitives adds the transposes.
"""
