"""An independent float64 implementation of SMILE (Tang et al., arXiv 2408.10174; the README's How it works),
written from the formula and the source weights, sharing no code with smile_cli."""

from __future__ import annotations

import torch
from torch import nn


def smile_reference(x, w0, b0, expert_weights, expert_biases, router_rank, expert_rank, top_k, tol=0.0):
    """y for inputs x (tokens, in), all in float64. expert_rank <= 0 means dense task updates; a list gives each
    expert its own rank.

    tol > 0: singular triplets with s <= tol are not directions of the update (rounding noise of a low-rank
    or zero update): they are zeroed, in the router as in the expert.

    Returns (y, chosen) where chosen is (tokens, top_k) expert indices (None with one expert)."""
    x, w0 = x.double(), w0.double()
    num_experts = len(expert_weights)
    deltas = [w.double() - w0 for w in expert_weights]
    svds = _svds(deltas, tol)
    weights, chosen = _routing(x, svds, router_rank, top_k)
    y = x @ w0.T
    if b0 is not None:
        y = y + b0.double()
    ranks = list(expert_rank) if isinstance(expert_rank, (list, tuple)) else [expert_rank] * num_experts
    for i, (u, s, vh) in enumerate(svds):
        if ranks[i] > 0:
            update = u[:, : ranks[i]] @ torch.diag(s[: ranks[i]]) @ vh[: ranks[i]]
        else:
            update = deltas[i]
        contribution = x @ update.T
        if b0 is not None:
            contribution = contribution + (expert_biases[i].double() - b0.double())
        y = y + weights[:, i : i + 1] * contribution
    return y, chosen


def _svds(deltas, tol):
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    if tol > 0:
        svds = [(u, s * (s > tol), vh * (s > tol)[:, None]) for u, s, vh in svds]
    return svds


def _routing(x, svds, router_rank, top_k):
    """(weights (tokens, experts), chosen (tokens, top_k) or None with one expert) for float64 inputs x."""
    tokens = x.shape[0]
    if len(svds) == 1:
        return torch.ones(tokens, 1, dtype=torch.float64), None
    logits = torch.stack([torch.linalg.vector_norm(x @ vh[:router_rank].T, dim=1) for _, _, vh in svds], dim=1)
    probs = torch.softmax(logits, dim=1)
    top, chosen = torch.topk(probs, top_k, dim=1)
    weights = torch.zeros_like(probs)
    for t in range(tokens):
        for j in range(top_k):
            weights[t, chosen[t, j]] = top[t, j] / top[t].sum()
    return weights, chosen


def reference_routing(x, w0, expert_weights, router_rank, top_k, tol=0.0):
    """The routing weights (tokens, experts) of smile_reference for inputs x (tokens, in), in float64."""
    w0 = w0.double()
    svds = _svds([w.double() - w0 for w in expert_weights], tol)
    return _routing(x.double(), svds, router_rank, top_k)[0]


class ReferenceSmileLinear(nn.Module):
    """Drop-in for an nn.Linear of a float64 base model: the reference formula from source weights."""

    def __init__(self, w0, b0, expert_weights, expert_biases, router_rank, expert_rank, top_k, tol=0.0):
        super().__init__()
        self.args = (w0, b0, expert_weights, expert_biases, router_rank, expert_rank, top_k, tol)
        self.weight = w0  # model code may read a linear layer's weight (T5 casts to wo.weight.dtype)

    def forward(self, x):
        shape = x.shape
        y, _ = smile_reference(x.reshape(-1, shape[-1]), *self.args)
        return y.reshape(*shape[:-1], -1)

    def routing(self, x):
        """The routing weights (tokens, experts) of this layer for inputs x (..., in)."""
        w0, _, expert_weights, _, router_rank, _, top_k, tol = self.args
        return reference_routing(x.reshape(-1, x.shape[-1]), w0, expert_weights, router_rank, top_k, tol)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_model(
    base_dir, expert_dirs, router_rank, expert_rank, top_k, targets=None, model_class=None, tol=0.0, ranks=None
):
    """The base model in float64 with its targeted nn.Linear modules replaced by ReferenceSmileLinear.

    targets: full module names; by default every decoder projection. model_class: the transformers class
    to load the base with (AutoModelForCausalLM by default). ranks: module name -> (router rank, [expert ranks])
    for modules whose ranks differ from router_rank / expert_rank."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = (model_class or AutoModelForCausalLM).from_pretrained(base_dir, dtype=torch.float64)
    expert_states = [load_file(f"{d}/model.safetensors") for d in expert_dirs]
    replaced = set()
    for name, module in list(model.named_modules()):
        chosen = name in targets if targets is not None else name.rsplit(".", 1)[-1] in PROJECTIONS
        if isinstance(module, nn.Linear) and chosen:
            ws = [s[name + ".weight"] for s in expert_states]
            bs = [s[name + ".bias"] for s in expert_states] if module.bias is not None else None
            b0 = module.bias.detach() if module.bias is not None else None
            rr, er = (ranks or {}).get(name, (router_rank, expert_rank))
            ref = ReferenceSmileLinear(module.weight.detach(), b0, ws, bs, rr, er, top_k, tol)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ref)
            replaced.add(name)
    assert targets is None or replaced == set(targets), set(targets) ^ replaced
    return model.eval()
