"""Routing variants (smile_routing): each against a float64 reference of its own formula, written here
independently of modeling_smile.py; faithful routing unchanged bit for bit; outputs built with a variant
generate the same tokens with and without the KV cache."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL
from smile_cli.cli import run
from smile_cli.modeling.modeling_smile import PER_TOKEN_ROUTING, ROUTING_MODES, SmileLinear, smile_routing_weights
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
    assert layer.router.routing == "faithful"
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


# the calibrated modes need --calibrate's routers: tests/test_calibrate.py
VARIANTS = [name for name in ROUTING_MODES if name not in PER_TOKEN_ROUTING and not name.startswith("calibrated")]
POOLED = [name for name in VARIANTS if ROUTING_MODES[name][1] != "likelihood"]


def ref_pool(pool, s):
    """(T,) float64 pooling of one row's real tokens' scores s (tokens, T), from the formulas in the docs."""
    assert pool == "mean"
    return s.mean(0)


@pytest.mark.parametrize("routing", POOLED)
@pytest.mark.parametrize("expert_rank", ["4", "full"], ids=["low-rank", "dense"])
def test_prompt_mode_matches_float64_reference(tmp_path, routing, expert_rank):
    """A model's routing weights for a padded batch: each router's float64 scores of the inputs it really got,
    averaged over each row's real tokens, then over the routers called so far, then top-k with temperature."""
    base, experts = make_family(tmp_path, "llama", num_experts=3)
    out = tmp_path / "out"
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out)]
    argv += ["--router-rank", "2", "--expert-rank", expert_rank, "--top-k", "2", "--routing", routing]
    assert run([*argv, "--routing-temperature", "0.7", "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    score, pool = ROUTING_MODES[routing]
    ids = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding in one row
    inputs, weights = {}, {}
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "SmileLinear"}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
    model.register_routing_hook(lambda name, w: weights.__setitem__(name, w.detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    states = [load_file(e / "model.safetensors") for e in experts]
    w0s = load_file(base / "model.safetensors")
    pooled = torch.zeros(3, 3, dtype=torch.float64)
    for n, name in enumerate(layers):  # call order = module order in a Llama
        x = inputs[name].double()
        ws = [s[name + ".weight"].double() for s in states]
        k = 0 if expert_rank == "full" else int(expert_rank)
        flat = ref_scores(score, x.reshape(-1, x.shape[-1]), w0s[name + ".weight"].double(), ws, 2, k).view(3, 7, 3)
        pooled += torch.stack([ref_pool(pool, flat[row, mask[row].bool()]) for row in range(3)])
        want = ref_top_k(pooled / (n + 1), 2, 0.7)
        torch.testing.assert_close(weights[name][:, 0].double(), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(weights[name], weights[name][:, :1].expand_as(weights[name]))  # one mix per row


@pytest.mark.parametrize("expert_rank", ["4", "full"], ids=["low-rank", "dense"])
def test_likelihood_prompt_matches_float64_reference(tmp_path, expert_rank):
    """likelihood-prompt: each row goes to the expert under which the next-token log-probability at its last real
    token is largest, every token forced to that expert; the reference forces each expert in turn through the
    public routing hook on the same folder loaded in float64 with faithful routing (left and right padding)."""
    base, experts = make_family(tmp_path, "llama", num_experts=3)
    out = tmp_path / "out"
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out)]
    argv += ["--router-rank", "2", "--expert-rank", expert_rank, "--routing", "likelihood-prompt", "--quiet"]
    assert run(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float64, smile_routing="faithful"
    ).eval()
    ids = torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    ids[1, -3:], mask[1, -3:] = 0, 0  # right padding
    last = torch.tensor([6, 3, 6, 6])
    confidence, logits_under = [], []
    for e in range(3):
        handle = ref.register_routing_hook(lambda name, w, e=e: F.one_hot(torch.full(w.shape[:-1], e), 3).to(w))
        with torch.no_grad():
            logits = ref(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        logits_under.append(logits)
        confidence.append(logits[torch.arange(4), last].log_softmax(-1).amax(-1))
    confidence = torch.stack(confidence, dim=1)  # (rows, experts) float64
    want = confidence.argmax(dim=1)
    weights = {}
    model.register_routing_hook(lambda name, w: weights.__setitem__(name, w.detach()))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert len(weights) == len([m for m in model.modules() if type(m).__name__ == "SmileRouter"])  # final pass only
    top2 = confidence.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # rows whose choice float32 rounding cannot flip
    assert int(clear.sum()) >= 3
    for w in weights.values():
        torch.testing.assert_close(w, F.one_hot(w[:, -1].argmax(-1), 3).float()[:, None].expand_as(w))
        assert torch.equal(w[clear, -1].argmax(-1), want[clear])
    for row in range(4):
        real = mask[row].bool()
        e = int(weights[next(iter(weights))][row, -1].argmax())
        torch.testing.assert_close(got[row, real].double(), logits_under[e][row, real], rtol=1e-4, atol=1e-4)


def test_unknown_routing_is_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown smile_routing"):
        SmileLinear(4, 4, False, 2, 1, 1, 1, routing="nope")
    with pytest.raises(ValueError, match="was removed"):
        SmileLinear(4, 4, False, 2, 1, 1, 1, routing="sequence-model")
    base, experts = make_family(tmp_path, "llama", num_experts=2)
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(tmp_path / "o")]
    assert run([*argv, "--routing", "nope", "--quiet"]) != 0
    assert run([*argv, "--routing", "prompt-model", "--routing-temperature", "0", "--quiet"]) != 0


@pytest.mark.parametrize("routing", VARIANTS)
def test_variant_output_generates_same_tokens_with_and_without_cache(tmp_path, routing):
    base, experts = make_family(tmp_path, "llama", num_experts=3)
    out = tmp_path / "out"
    argv = ["upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(out)]
    assert run([*argv, "--router-rank", "2", "--expert-rank", "4", "--routing", routing, "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["smile_routing"] == routing and config["smile_routing_temperature"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.model.layers[1].mlp.up_proj.router.routing == routing
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding in one row
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    # (decoding by hand against the prompt's mix: tests/test_generation_clients.py)
    assert torch.equal(cached, recomputed)
    # routing really differs from faithful here: the model's next-token logits change
    faithful_out = tmp_path / "faithful"
    assert run([*argv[:-1], str(faithful_out), "--router-rank", "2", "--expert-rank", "4", *FAITHFUL, "--quiet"]) == 0
    faithful = AutoModelForCausalLM.from_pretrained(faithful_out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = faithful.eval()(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4
