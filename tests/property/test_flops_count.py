"""FLOPs of a transformer layer: 24bsh^2 + 4bs^2h forward, 2x backward, recompute recorded vs traversed.

Convention (Megatron/Korthikanti, FEATURES.md 46): a multiply-add is 2 FLOPs, only matmuls
count (no bias add, softmax, norms), MLP width 4h, causal masking not discounted.
"""
import optree
import pytest
import torch

from shardfn import flops
from shardfn.layers import LayerRecompute, LlamaConfig, attention, block, explicit_attention

S, B, H, A = 8, 2, 16, 4
GPT = LlamaConfig(vocab_size=8, hidden=H, num_layers=1, num_heads=A, norm="layer", mlp="gelu", position="none",
                  bias=True, ffn_hidden=4 * H)
FWD = 24 * B * S * H * H + 4 * B * S * S * H


def _count(attn_fn, recompute):
    params = block.init(torch.Generator().manual_seed(0), GPT, 0)
    for t in optree.tree_leaves(params):
        t.requires_grad_()
    x = torch.randn(B, S, H)
    return flops.count(block.apply, params, x, config=GPT, recompute=recompute, attn_fn=attn_fn)


@pytest.mark.parametrize("attn_fn", [explicit_attention, attention], ids=["explicit", "cpu_flash"])
def test_layer_forward_and_backward_flops(attn_fn):
    c = _count(attn_fn, LayerRecompute())
    assert c.forward == FWD
    assert c.recorded == 3 * FWD  # backward = 2x forward in model FLOPs
    # The flash backward recomputes q k^T (2bs^2h) inside its kernel: traversed, not recorded.
    kernel_recompute = 2 * B * S * S * H if attn_fn is attention else 0
    assert c.recompute == kernel_recompute and c.traversed == 3 * FWD + kernel_recompute


@pytest.mark.parametrize("attn_fn", [explicit_attention, attention], ids=["explicit", "cpu_flash"])
def test_recompute_is_traversed_not_recorded(attn_fn):
    kernel = 2 * B * S * S * H if attn_fn is attention else 0  # flash backward's own q k^T
    full = _count(attn_fn, LayerRecompute(full=True))
    # torch's checkpoint stops re-running once every saved tensor is rebuilt (early stop), so the
    # layer's last matmul (fc2, 2bs*4h*h) is not re-run: full recompute = forward - fc2.
    fc2 = 2 * B * S * 4 * H * H
    assert full.recorded == 3 * FWD and full.recompute == FWD - fc2 + kernel
    sel = _count(attn_fn, LayerRecompute(selective=True))
    # Explicit core: the re-run stops before P V (early stop), so only q k^T (2bs^2h) re-runs;
    # the flash core re-runs its one forward kernel (4bs^2h).
    core = 4 * B * S * S * H if attn_fn is attention else 2 * B * S * S * H
    assert sel.recorded == 3 * FWD and sel.recompute == core + kernel
    act = _count(attn_fn, LayerRecompute(activation=True, norm=True))
    assert act.recorded == 3 * FWD and act.recompute == kernel  # elementwise recomputes cost 0 FLOPs


def test_count_matmul_doc_example():
    w = torch.randn(8, 4, requires_grad=True)
    c = flops.count(lambda x: x @ w, torch.randn(3, 8))
    assert c.forward == 2 * 3 * 8 * 4 and c.backward == 2 * 3 * 8 * 4  # dW only (closed-over w); x needs none
