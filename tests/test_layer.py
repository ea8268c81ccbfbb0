"""SmileLinear, the layer math of modeling_smile.py, against the float64 reference formula."""

import pytest
import torch

from reference import smile_reference
from smile_cli.modeling.modeling_smile import SmileLinear


def build_layer(w0, b0, expert_weights, expert_biases, router_rank, expert_rank, top_k, dtype=torch.float64):
    """A SmileLinear filled by the checkpoint layout documented at the top of modeling_smile.py."""
    out_f, in_f = w0.shape
    layer = SmileLinear(in_f, out_f, b0 is not None, len(expert_weights), top_k, router_rank, expert_rank).to(dtype)
    svds = [torch.linalg.svd(w - w0, full_matrices=False) for w in expert_weights]
    with torch.no_grad():
        layer.shared_linear.weight.copy_(w0)
        if b0 is not None:
            layer.shared_linear.bias.copy_(b0)
            layer.experts_bias.copy_(torch.stack([b - b0 for b in expert_biases]))
        if len(expert_weights) > 1:
            layer.router.weight.copy_(torch.cat([vh[:router_rank] for _, _, vh in svds]))
        if expert_rank > 0:
            layer.experts_svh.copy_(torch.cat([s[:expert_rank, None] * vh[:expert_rank] for _, s, vh in svds]))
            layer.experts_u.copy_(torch.cat([u[:, :expert_rank] for u, _, _ in svds], dim=1))
        else:
            layer.experts_delta.copy_(torch.cat([w - w0 for w in expert_weights]))
    return layer


def random_layer_inputs(num_experts, bias, out_f=24, in_f=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    ws = [
        w0
        + torch.randn(out_f, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, in_f, generator=g, dtype=torch.float64)
        + 0.05 * torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        for _ in range(num_experts)
    ]
    b0 = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    bs = [b0 + torch.randn(out_f, generator=g, dtype=torch.float64) for _ in range(num_experts)] if bias else None
    x = torch.randn(5, 7, in_f, generator=g, dtype=torch.float64)
    return w0, b0, ws, bs, x


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("expert_rank", [4, 0], ids=["low-rank", "dense"])
def test_layer_matches_reference(top_k, bias, expert_rank):
    w0, b0, ws, bs, x = random_layer_inputs(3, bias)
    layer = build_layer(w0, b0, ws, bs, 3, expert_rank, top_k)
    want, _ = smile_reference(x.reshape(-1, 20), w0, b0, ws, bs, 3, expert_rank, top_k)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (5, 7, 24)
    # routing weights are computed in float32 by design; everything else in the layer is float64 here
    torch.testing.assert_close(got.reshape(-1, 24), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_one_expert_is_always_added(bias):
    w0, b0, ws, bs, x = random_layer_inputs(1, bias)
    layer = build_layer(w0, b0, ws, bs, 3, 4, 1)
    want, _ = smile_reference(x.reshape(-1, 20), w0, b0, ws, bs, 3, 4, 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).reshape(-1, 24), want, rtol=1e-5, atol=1e-5)


def test_float32_layer_routes_in_float32_and_matches():
    w0, b0, ws, bs, x = random_layer_inputs(4, True, seed=3)
    layer = build_layer(w0, b0, ws, bs, 2, 5, 2, dtype=torch.float32)
    want, chosen = smile_reference(x.reshape(-1, 20), w0, b0, ws, bs, 2, 5, 2)
    with torch.no_grad():
        weights = layer.router(x.reshape(-1, 20).float())
        got = layer(x.float())
    assert weights.dtype == torch.float32
    assert torch.equal(weights.topk(2).indices.sort().values, chosen.sort().values)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(35))
    torch.testing.assert_close(got.reshape(-1, 24).double(), want, rtol=1e-4, atol=1e-4)
