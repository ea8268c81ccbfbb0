"""Routing variants (smile_routing): each against a float64 reference of its own formula, written here
independently of modeling_smile.py; faithful routing unchanged bit for bit; outputs built with a variant
generate the same tokens with and without the KV cache."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from smile_cli.cli import run
from smile_cli.modeling.modeling_smile import ROUTING_MODES, SmileLinear, SmileRoutingState, smile_routing_weights
from test_layer import build_layer, random_layer_inputs
from tiny_models import make_family

T, G, K, IN, OUT = 3, 3, 4, 20, 24


# ---- the faithful router and forward exactly as they were before routing variants existed -----------------
def old_smile_routing_weights(x, router_weight, num_experts, top_k):
    if num_experts == 1:
        return x.new_ones(x.shape[0], 1, dtype=torch.float32)
    projections = F.linear(x.float(), router_weight.float())
    logits = projections.view(x.shape[0], num_experts, -1).norm(dim=-1)
    probs = logits.softmax(dim=-1)
    if top_k >= num_experts:
        return probs
    kept, chosen = probs.topk(top_k, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, chosen, kept)


def old_forward(layer, x):
    leading_shape = x.shape[:-1]
    x = x.reshape(-1, layer.in_features)
    y = layer.shared_linear(x)
    weights = old_smile_routing_weights(x, layer.router.weight, layer.num_experts, layer.top_k)
    if layer.rank_of_expert > 0:
        hidden = F.linear(x, layer.experts_svh)
        hidden.view(-1, layer.num_experts, layer.rank_of_expert).mul_(weights.unsqueeze(-1).to(hidden.dtype))
        y = y.addmm_(hidden, layer.experts_u.T)
    else:
        updates = F.linear(x, layer.experts_delta).view(-1, layer.num_experts, layer.out_features)
        y = y + (updates * weights.unsqueeze(-1).to(updates.dtype)).sum(dim=1)
    if layer.experts_bias is not None:
        y = y + weights.to(layer.experts_bias.dtype) @ layer.experts_bias
    return y.view(*leading_shape, layer.out_features)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_rank", [K, 0], ids=["low-rank", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faithful_unchanged_bit_for_bit(top_k, expert_rank, dtype):
    w0, b0, ws, bs, x = random_layer_inputs(T, True)
    layer = build_layer(w0, b0, ws, bs, G, expert_rank, top_k, dtype=dtype)
    assert layer.routing == "faithful"
    x = x.to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), old_forward(layer, x))
        flat = x.reshape(-1, IN)
        assert torch.equal(
            smile_routing_weights(flat, layer.router.weight, T, top_k),
            old_smile_routing_weights(flat, layer.router.weight, T, top_k),
        )


# ---- float64 references of every variant's formula -----------------------------------------------------------
def ref_scores(score, x, w0, ws, g, expert_rank):
    """(tokens, T) float64 scores of every token x (tokens, in), written from the formulas in the docs."""
    out = torch.zeros(x.shape[0], len(ws), dtype=torch.float64)
    for i, w in enumerate(ws):
        u, s, vh = torch.linalg.svd(w - w0, full_matrices=False)
        for n in range(x.shape[0]):
            xn = x[n]
            proj = (vh[:g] @ xn).norm() / (xn.norm() * (g / xn.numel()) ** 0.5)
            if expert_rank > 0:  # top min(g, k) S-weighted directions
                d = min(g, expert_rank)
                rows = s[:d, None] * vh[:d]
            else:  # the dense update: all directions
                rows = w - w0
            spec = (rows @ xn).norm() / (xn.norm() * rows.norm() / xn.numel() ** 0.5)
            out[n, i] = {"projection": proj, "spectral": spec, "combined": (proj + spec) / 2}[score]
    return out


def ref_top_k(scores, top_k, temperature):
    p = torch.softmax(scores / temperature, dim=-1)
    out = torch.zeros_like(p)
    for n in range(p.shape[0]):
        idx = sorted(range(p.shape[1]), key=lambda i: -p[n, i].item())[:top_k]
        total = sum(p[n, i] for i in idx)
        for i in idx:
            out[n, i] = p[n, i] / total
    return out


def ref_tokens(mode, scores, batch, length):
    """Pool (B*L, T) scores over positions: token: none; sequence: causal mean; prompt: mean of all."""
    s = scores.view(batch, length, -1)
    if mode == "token":
        return scores
    out = torch.zeros_like(s)
    for b in range(batch):
        for t in range(length):
            out[b, t] = s[b, : t + 1].mean(dim=0) if mode == "sequence" else s[b].mean(dim=0)
    return out.reshape(batch * length, -1)


def ref_output(x, w0, b0, ws, bs, weights, expert_rank):
    y = x @ w0.T + b0
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        u, s, vh = torch.linalg.svd(w - w0, full_matrices=False)
        delta = (u[:, :expert_rank] * s[:expert_rank]) @ vh[:expert_rank] if expert_rank > 0 else w - w0
        y = y + weights[:, i : i + 1] * (x @ delta.T + (b - b0))
    return y


VARIANTS = [name for name in ROUTING_MODES if name != "faithful"]


@pytest.mark.parametrize("routing", VARIANTS)
@pytest.mark.parametrize(("expert_rank", "top_k"), [(K, 1), (0, 2)], ids=["low-rank-top1", "dense-top2"])
def test_variant_layer_matches_float64_reference(routing, expert_rank, top_k):
    """Three layers sharing one routing state (layers 0 and 1 of a fake model; the first two read one input)."""
    score, pool, tokens = ROUTING_MODES[routing]
    temperature = 0.7
    setups = [random_layer_inputs(T, True, seed=s) for s in (0, 1, 2)]
    x = setups[0][4]  # (5, 7, in): 5 sequences of 7 positions, one input for all three layers
    layers = [build_layer(*s[:4], G, expert_rank, top_k) for s in setups]
    state = SmileRoutingState()
    places = [("model.layers.0.attn", "0"), ("model.layers.0.attn", "0"), ("model.layers.1.mlp", "1")]
    for layer, (parent, index) in zip(layers, places, strict=True):
        layer.set_routing(routing, temperature)
        layer.routing_state, layer.routing_parent, layer.routing_layer = state, parent, index
    flat = x.reshape(-1, IN)
    own = [ref_tokens(tokens, ref_scores(score, flat, s[0], s[2], G, expert_rank), 5, 7) for s in setups]
    if pool == "module":
        pooled = own
    elif pool == "model":  # running mean over the layers called so far
        pooled = [own[0], (own[0] + own[1]) / 2, (own[0] + own[1] + own[2]) / 3]
    else:  # layer / input: the first two share decoder layer 0 and read the same tensor; the third is alone
        pooled = [own[0], (own[0] + own[1]) / 2, own[2]]
    want_w = [ref_top_k(p, top_k, temperature) for p in pooled]
    state.begin(None, True, x.shape[1])
    for n, layer in enumerate(layers):
        with torch.no_grad():
            layer._leading_shape = x.shape[:-1]
            torch.testing.assert_close(layer.routing_weights(flat).double(), want_w[n], rtol=1e-5, atol=1e-5)
    state.begin(None, True, x.shape[1])  # the forward pass of the stack, from a fresh state
    for layer, (w0, b0, ws, bs, _), w in zip(layers, setups, want_w, strict=True):
        with torch.no_grad():
            got = layer(x)
        want = ref_output(flat, w0, b0, ws, bs, w, expert_rank)
        torch.testing.assert_close(got.reshape(-1, OUT), want, rtol=1e-5, atol=1e-5)


def test_sequence_and_prompt_state_carry_over_steps_on_a_lone_layer():
    """Without a model: an input with several positions starts a sequence; single positions continue it."""
    w0, b0, ws, bs, x = random_layer_inputs(T, False)
    for routing, tokens in (("sequence", "sequence"), ("prompt", "prompt")):
        layer = build_layer(w0, b0, ws, bs, G, K, 1)
        layer.set_routing(routing)
        whole = ref_tokens(tokens, ref_scores("projection", x.reshape(-1, IN), w0, ws, G, K), 5, 7).view(5, 7, T)
        with torch.no_grad():
            layer(x[:, :4])  # the prompt: 4 positions
            for t in range(4, 7):
                layer._leading_shape = torch.Size([5, 1])
                w = layer.routing_weights(x[:, t])  # one decoding step (updates the running state)
                if tokens == "sequence":  # causal mean over positions 0..t
                    want = ref_top_k(whole[:, t], 1, 1.0)
                else:  # the mix of the 4 prompt positions, frozen
                    prompt = ref_scores("projection", x[:, :4].reshape(-1, IN), w0, ws, G, K).view(5, 4, T)
                    want = ref_top_k(prompt.mean(dim=1), 1, 1.0)
                torch.testing.assert_close(w.double(), want)


def test_unknown_routing_is_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown smile_routing"):
        SmileLinear(4, 4, False, 2, 1, 1, 1, routing="nope")
    base, experts = make_family(tmp_path, "llama", num_experts=2)
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(tmp_path / "o")]
    assert run([*argv, "--routing", "nope", "--quiet"]) != 0
    assert run([*argv, "--routing", "prompt-model", "--routing-temperature", "0", "--quiet"]) != 0


@pytest.mark.parametrize("routing", ["prompt-model", "spectral-prompt", "sequence-model", "input"])
def test_variant_output_generates_same_tokens_with_and_without_cache(tmp_path, routing):
    base, experts = make_family(tmp_path, "llama", num_experts=3)
    out = tmp_path / "out"
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out)]
    assert run([*argv, "--router-rank", "2", "--expert-rank", "4", "--routing", routing, "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["smile_routing"] == routing and config["smile_routing_temperature"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    layer = model.model.layers[1].mlp.up_proj
    assert layer.routing == routing and layer.routing_state is model.model.layers[0].self_attn.q_proj.routing_state
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding in one row
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
        # and by hand: a full forward pass over each prefix, no cache, argmax of the last position
        seq = ids
        for _ in range(8):
            m = torch.cat([mask, torch.ones(3, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
            nxt = model(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, seq)
    # routing really differs from faithful here: the model's next-token logits change
    faithful_out = tmp_path / "faithful"
    assert run([*argv[:-1], str(faithful_out), "--router-rank", "2", "--expert-rank", "4", "--quiet"]) == 0
    faithful = AutoModelForCausalLM.from_pretrained(faithful_out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = faithful.eval()(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4
