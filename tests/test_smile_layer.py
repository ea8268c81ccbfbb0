"""layer.smile_layer, SMILE's construction of one linear, against the float64 reference formula: its tensors,
loaded into modeling_smile's SmileLinear, give the reference's outputs; and the same for LoRA experts, whose
update comes from exact factors."""

import pytest
import torch

from reference import smile_reference
from smile_cli.factorize import Factors
from smile_cli.inputs.experts import BaseLayer, LoraExpert, TaskUpdate, Wanted
from smile_cli.inputs.lora import LoraAdapter, LoraModule
from smile_cli.layer import smile_layer
from smile_cli.modeling.modeling_smile import SmileLinear, smile_linear_shapes
from smile_cli.plan import LinearPlan, LinearRanks
from test_layer import random_layer_inputs


def exact_update(w0, b0, w, b, rank, dense):
    u, s, vh = torch.linalg.svd(w - w0, full_matrices=False)
    bias = b - b0 if b0 is not None else None
    return TaskUpdate(Factors(u[:, :rank], s[:rank], vh[:rank]), False, (w - w0) if dense else None, bias)


def load_layer(tensors: dict, w0, b0, num_experts, top_k, router_rank, expert_rank) -> SmileLinear:
    out_f, in_f = w0.shape
    layer = SmileLinear(in_f, out_f, b0 is not None, num_experts, top_k, router_rank, expert_rank).double()
    layer.load_state_dict({name: tensor.double() for name, tensor in tensors.items()}, strict=True)
    return layer


def collect(pieces) -> dict:
    """The layer's tensors by name; a dense experts_delta comes in one block per expert."""
    tensors: dict[str, list] = {}
    for name, tensor in pieces:
        tensors.setdefault(name, []).append(tensor)
    return {name: torch.cat(blocks) for name, blocks in tensors.items()}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("expert_rank", [4, 0], ids=["low-rank", "dense"])
def test_smile_layer_matches_reference(top_k, bias, expert_rank):
    w0, b0, ws, bs, x = random_layer_inputs(3, bias)
    ranks = LinearRanks(3, (expert_rank,) * 3)
    updates = [
        exact_update(w0, b0, w, bs[i] if bias else None, ranks.factor_rank_of(i), expert_rank == 0)
        for i, w in enumerate(ws)
    ]
    pieces = list(smile_layer(w0, b0, iter(updates), ranks))
    names = [name for name, _ in pieces]
    if expert_rank == 0:
        assert names.count("experts_delta") == 3  # streamed one expert at a time
    tensors = collect(pieces)
    # the one layout: the layer's tensors, in checkpoint order, are SmileLinear's parameters
    layout = smile_linear_shapes(20, 24, bias, 3, 3, expert_rank)
    assert [(name, tuple(t.shape)) for name, t in tensors.items()] == layout
    shapes = {
        name: tuple(p.shape) for name, p in SmileLinear(20, 24, bias, 3, top_k, 3, expert_rank).state_dict().items()
    }
    assert shapes == dict(layout)
    layer = load_layer(tensors, w0, b0, 3, top_k, 3, expert_rank)
    want, _ = smile_reference(x.reshape(-1, 20), w0, b0, ws, bs, 3, expert_rank, top_k)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.reshape(-1, 24), want, rtol=1e-5, atol=1e-5)


def test_smile_layer_with_per_expert_ranks_matches_reference():
    w0, b0, ws, bs, x = random_layer_inputs(3, True, seed=5)
    ranks = LinearRanks(2, (1, 5, 3))
    updates = [exact_update(w0, b0, w, bs[i], ranks.factor_rank_of(i), False) for i, w in enumerate(ws)]
    tensors = collect(smile_layer(w0, b0, updates, ranks))
    assert tensors["experts_svh"].shape == (9, 20) and tensors["experts_u"].shape == (24, 9)
    out_f, in_f = w0.shape
    layer = SmileLinear(in_f, out_f, True, 3, 1, 2, [1, 5, 3]).double()
    layer.load_state_dict({name: tensor.double() for name, tensor in tensors.items()}, strict=True)
    want, _ = smile_reference(x.reshape(-1, 20), w0, b0, ws, bs, 2, [1, 5, 3], 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).reshape(-1, 24), want, rtol=1e-5, atol=1e-5)


def test_lora_expert_update_feeds_the_layer_exactly(tmp_path):
    """A LoRA expert's exact factors of scale * B @ A, through smile_layer, give the reference on the merged weight."""
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(24, 20, generator=g, dtype=torch.float64)
    b, a = torch.randn(24, 3, generator=g), torch.randn(3, 20, generator=g)
    factors = {"B": b, "A": a}
    adapter = LoraAdapter("lora", tmp_path, {}, {}, None, [], [], {"m": LoraModule("m", "A", "B", 3, 0.5)})
    expert = LoraExpert(adapter)
    lin = LinearPlan("m", 24, 20, False)

    def read(source, name):
        assert source is adapter
        return factors[name]

    assert [name for _, name in expert.reads(lin)] == ["B", "A"]

    def no_base():
        raise AssertionError("a LoRA expert needs no base weight")

    update = expert.update(BaseLayer(lin, read, no_base, factorizer=None), Wanted(4, energy=True))
    merged = w0 + 0.5 * b.double() @ a.double()
    assert update.energy == pytest.approx(float((0.5 * b.double() @ a.double()).square().sum()), rel=1e-5)
    assert not update.factors.s[3:].any()  # beyond the LoRA rank: zeros
    other = w0 + torch.randn(24, 20, generator=g, dtype=torch.float64)
    second = exact_update(w0, None, other, None, 4, False)
    ranks = LinearRanks(2, (4, 4))
    tensors = collect(smile_layer(w0, None, [update, second], ranks))
    layer = load_layer(tensors, w0, None, 2, 1, 2, 4)
    x = torch.randn(9, 20, generator=g, dtype=torch.float64)
    want, _ = smile_reference(x, w0, None, [merged, other], None, 2, 4, 1, tol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("expert_ranks", [4, [1, 5, 3]], ids=["uniform", "per-expert"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_a_token_alone_reads_only_its_experts_and_matches_the_reference(expert_ranks, top_k):
    """One token (a decode step at batch 1) uses top_k of the 3 experts: SmileLinear then reads only their factors
    (the others' weights are 0), and gives the reference's output, as in a batch where every expert is used."""
    w0, b0, ws, bs, x = random_layer_inputs(3, True, seed=11)
    ranks = LinearRanks(3, tuple(expert_ranks) if isinstance(expert_ranks, list) else (expert_ranks,) * 3)
    updates = [exact_update(w0, b0, w, bs[i], ranks.factor_rank_of(i), False) for i, w in enumerate(ws)]
    tensors = collect(smile_layer(w0, b0, updates, ranks))
    layer = SmileLinear(20, 24, True, 3, top_k, 3, expert_ranks).double()
    layer.load_state_dict({name: tensor.double() for name, tensor in tensors.items()}, strict=True)
    tokens = x.reshape(-1, 20)
    want, _ = smile_reference(tokens, w0, b0, ws, bs, 3, expert_ranks, top_k)
    with torch.no_grad():
        assert layer._active_experts(layer.router(tokens)) is None  # this batch uses every expert
        together = layer(tokens)
        for t in range(tokens.shape[0]):
            alone = tokens[t : t + 1]
            assert len(layer._active_experts(layer.router(alone))) == top_k
            torch.testing.assert_close(layer(alone), want[t : t + 1], rtol=1e-5, atol=1e-5)
            # routers compute in float32, whose matmul of one row may round unlike a batch's: float32-close
            torch.testing.assert_close(layer(alone), together[t : t + 1], rtol=1e-5, atol=1e-5)
