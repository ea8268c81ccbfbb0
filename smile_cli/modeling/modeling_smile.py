# SMILE (Sparse Mixture of Low-rank Experts) layers and models.
#
# This file is copied unchanged into every model folder written by `smile upscale`, next to
# configuration_smile.py. It imports only torch and transformers, never the smile_cli package.
# The smile_cli package imports this same file, so the forward math exists once.
#
# Method: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
# Pre-Trained Foundation Models" (arXiv 2408.10174). For one linear layer with base weight W0, bias b0
# and T fine-tuned versions (Wi, bi), the task update dWi = Wi - W0 = Ui Si Vi^T is factorized once:
#
#   router of expert i   Vi[:, :gate_k]^T                      (gate_k x in)
#   routing logit        r_i(x) = || Vi[:, :gate_k]^T x ||_2   computed in float32
#   weights              p = softmax(r); keep the top-k; renormalise the kept weights to sum to 1
#   expert i             u_i = Ui[:, :k],  svh_i = diag(Si[:k]) Vi[:, :k]^T,  bias_i = bi - b0
#   output               y = W0 x + b0 + sum_{i in topk(x)} p_i (u_i svh_i x + bias_i)
#
# With one expert (T = 1) there is no router: the expert is always added. With rank_of_expert = 0 the
# experts are the dense task updates dWi themselves. Ranks may differ between modules and between the experts
# of one module (config.smile_ranks, written by budgeted rank allocation): expert i of a module keeps rank k_i,
# and K = k_1 + ... + k_T below (T*k when every expert has rank k).
#
# Parameters of one SmileLinear, as stored in the checkpoint (all experts side by side, so that the
# forward pass is a few dense matmuls over every token, with no loop over tokens or experts):
#   shared_linear.weight  (out, in)         W0           shared_linear.bias  (out,)     b0
#   router.weight         (T*gate_k, in)    routers of experts 0..T-1 stacked; float32; absent when T = 1
#   experts_svh           (K, in)           svh_0; svh_1; ...      (low-rank experts)
#   experts_u             (out, K)          [u_0 | u_1 | ...]      (low-rank experts)
#   experts_delta         (T*out, in)       dW_0; dW_1; ...        (dense experts, rank_of_expert = 0)
#   experts_bias          (T, out)          b_i - b0; present when the base layer has a bias
#
# Models: for any transformers model class `X` (MistralForCausalLM, T5ForConditionalGeneration,
# CLIPVisionModel, ...) this module provides `SmileX`, built on first use: X whose nn.Linear modules named
# in config.smile_target_modules are SmileLinear layers. config.json's auto_map names the classes to use.
import re

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel

from .configuration_smile import smile_config_class


def smile_routing_weights(x, router_weight, num_experts, top_k):
    """Routing weights (tokens, T) in float32: the kept experts' renormalised softmax weights, 0 elsewhere.

    x: (tokens, in). router_weight: (T*gate_k, in), experts' router rows stacked in order.
    """
    if num_experts == 1:
        return x.new_ones(x.shape[0], 1, dtype=torch.float32)
    projections = F.linear(x.float(), router_weight.float())  # (tokens, T*gate_k)
    logits = projections.view(x.shape[0], num_experts, -1).norm(dim=-1)  # (tokens, T)
    return top_k_weights(logits, top_k)


def top_k_weights(logits, top_k):
    """softmax(logits) over the last dim; keep the top_k; renormalise the kept weights to sum to 1."""
    probs = logits.softmax(dim=-1)
    if top_k >= probs.shape[-1]:
        return probs
    kept, chosen = probs.topk(top_k, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, chosen, kept)


# ---------------------------------------------------------------------------------------------------------
# Routing variants (config field `smile_routing`, temperature `smile_routing_temperature`; data-free, no
# training, no extra parameters). "faithful" is the paper's router above. The others compute a normalised
# score per token and expert, then pool it over tokens and/or over SmileLinear modules before the top-k:
#
#   score "projection"  s_i(x) = ||V_i^T x|| / (||x|| sqrt(g / in))   1 for a random x: comparable between
#                                                                       layers, so scores can be pooled
#   score "spectral"    s_i(x) = ||S_i V_i^T x|| / (||x|| ||S_i||_F / sqrt(in))  with the top g = rank_of_router
#                       singular directions, S-weighted (read from experts_svh, or from the dense update
#                       dW_i when rank_of_expert = 0: then all its directions); 1 for a random x
#   score "combined"    the mean of the two scores above
#   pool "module"       each SmileLinear on its own
#   pool "input"        running mean over the SmileLinears of one parent module that read the same input tensor
#                       (q/k/v; gate/up), in call order: k sees mean(q, k), v sees mean(q, k, v)
#   pool "layer"        running mean over the SmileLinears of one decoder layer called so far (same token)
#   pool "model"        running mean over every SmileLinear called so far in this forward pass (same token):
#                       layer l decides from layers 0..l
#   tokens "token"      each token on its own
#   tokens "sequence"   each module's score is first averaged over the sequence's real (attention-mask) tokens
#                       up to and including the current one (causal running mean, carried across generate()
#                       steps in a buffer per batch row, reset when a new sequence starts): the prompt decides,
#                       generated tokens keep (and slowly update) its expert mix. The same with or without
#                       the KV cache. Beam search (row reordering) is not tracked.
#   tokens "prompt"     each module's score is averaged over all real tokens of the prompt (the first forward
#                       pass of a sequence; not causal within it) and that mix is kept, frozen, for every token
#                       of the sequence, generated ones included. A forward pass without cache whose input_ids
#                       start with the previous prompt (same batch) recomputes that sequence: its first tokens
#                       are the prompt, so generation with and without the KV cache agree.
#   weights             top_k_weights(pooled / temperature, top_k)
#
# Pools other than "module" and the "sequence" bookkeeping use a SmileRoutingState shared by the model's
# SmileLinears (attach_smile_routing); a SmileLinear used on its own pools over nothing and treats every input
# with more than one position as a new sequence.
ROUTING_MODES = {
    # name: (score, pool, tokens)
    "faithful": ("faithful", "module", "token"),
    "normalized": ("projection", "module", "token"),
    "input": ("projection", "input", "token"),
    "layer": ("projection", "layer", "token"),
    "model": ("projection", "model", "token"),
    "sequence": ("projection", "module", "sequence"),
    "sequence-model": ("projection", "model", "sequence"),
    "spectral": ("spectral", "module", "token"),
    "spectral-model": ("spectral", "model", "token"),
    "spectral-sequence": ("spectral", "model", "sequence"),
    "prompt": ("projection", "module", "prompt"),
    "prompt-model": ("projection", "model", "prompt"),
    "spectral-prompt": ("spectral", "model", "prompt"),
    "combined-prompt": ("combined", "model", "prompt"),
}
DEFAULT_ROUTING = "faithful"


def projection_scores(x, router_weight, num_experts):
    """(tokens, T) float32: ||V_i^T x|| / (||x|| sqrt(g / in)); 0 for x = 0."""
    x = x.float()
    g = router_weight.shape[0] // num_experts
    norms = F.linear(x, router_weight.float()).view(x.shape[0], num_experts, g).norm(dim=-1)
    scale = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * (g / x.shape[-1]) ** 0.5
    return norms / scale


def spectral_scores(x, weighted_directions, num_experts):
    """(tokens, T) float32: ||S_i V_i^T x|| / (||x|| ||S_i||_F / sqrt(in)) from the stacked rows S_i V_i^T."""
    x = x.float()
    rows = weighted_directions.float().view(num_experts, -1, x.shape[-1])  # (T, g, in)
    norms = torch.einsum("ti,egi->teg", x, rows).norm(dim=-1)  # (tokens, T)
    energy = rows.flatten(1).norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)  # ||S_i||_F
    scale = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / x.shape[-1] ** 0.5
    return norms / (scale * energy)


def sequence_mean(scores, state_sum, state_count, mask, fresh):
    """Causal running mean of scores (B, L, T) over real positions (mask (B, L) of 0/1), continuing the sums
    state_sum (B, T) / state_count (B, 1) of earlier steps unless fresh. Returns (means, new_sum, new_count)."""
    batch = scores.shape[0]
    mask = mask.to(scores.dtype).unsqueeze(-1)  # (B, L, 1)
    sums = (scores * mask).cumsum(dim=1)
    counts = mask.cumsum(dim=1)
    if not fresh and state_sum is not None and state_sum.shape[0] == batch:
        sums = sums + state_sum.unsqueeze(1)
        counts = counts + state_count.unsqueeze(1)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), scores)  # no real token yet: the token's own
    return means, sums[:, -1], counts[:, -1]


class SmileRoutingState:
    """What the SmileLinears of one model share during a forward pass: the pooled scores so far, and for
    "sequence" routing the batch's attention mask and whether a new sequence starts (set by a forward pre-hook
    on the model, see attach_smile_routing)."""

    def __init__(self):
        self.prompt_ids = None  # "prompt" routing: input_ids of the current sequence's prompt
        self.begin(None, True)

    def begin(self, mask, fresh, prompt_length=None):
        self.mask = mask  # (B, L) of the current positions, or None (all real)
        self.fresh = fresh
        self.prompt_length = prompt_length  # "prompt" routing: the first positions that form the prompt
        self.pools = {}  # pool key -> [sum (tokens, T), count]

    def find_prompt(self, ids):
        """Length of the prompt in a forward pass without cache over ids (B, L): the stored prompt's when ids
        extend it (a recomputation of the same sequence), else L (ids are a new prompt, now stored)."""
        prompt = self.prompt_ids
        if (
            prompt is not None
            and ids.shape[0] == prompt.shape[0]
            and ids.shape[1] > prompt.shape[1]
            and torch.equal(ids[:, : prompt.shape[1]], prompt.to(ids.device))
        ):
            return prompt.shape[1]
        self.prompt_ids = ids.detach().clone()
        return ids.shape[1]

    def pool(self, key, scores):
        entry = self.pools.get(key)
        if entry is None or entry[0].shape != scores.shape:
            entry = self.pools[key] = [torch.zeros_like(scores), 0]
        entry[0] = entry[0] + scores
        entry[1] += 1
        return entry[0] / entry[1]


def _past_length(kwargs):
    cache = kwargs.get("past_key_values")
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


def attach_smile_routing(model, config):
    """Give every SmileLinear of model the config's routing mode, its place (layer, parent) and one shared
    SmileRoutingState, reset before each forward pass by a pre-hook on model. Faithful routing needs none."""
    routing = getattr(config, "smile_routing", None) or DEFAULT_ROUTING
    temperature = float(getattr(config, "smile_routing_temperature", None) or 1.0)
    state = SmileRoutingState()
    for name, module in model.named_modules():
        if isinstance(module, SmileLinear):
            module.set_routing(routing, temperature)
            module.routing_state = state
            module.routing_parent = name.rpartition(".")[0]
            layer = re.search(r"\.(\d+)\.", "." + name)
            module.routing_layer = layer.group(1) if layer else ""

    def begin(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        length = ids.shape[1] if ids is not None and ids.dim() > 1 else None
        past = _past_length(kwargs)
        if mask is not None and mask.dim() == 2 and length is not None:
            if past == 0 and mask.shape[1] > length:
                past = mask.shape[1] - length
            mask = mask[:, -length:]
        else:
            mask = None
        prompt_length = None
        if past == 0 and ids is not None and ids.dim() == 2 and not ids.is_floating_point():
            prompt_length = state.find_prompt(ids)
        elif past == 0:
            prompt_length = length
        state.begin(mask, past == 0, prompt_length)

    if routing != "faithful":
        model.register_forward_pre_hook(begin, with_kwargs=True)
    return model


class SmileLinear(nn.Module):
    """A base nn.Linear plus T routed experts built from the fine-tuned models' task updates."""

    def __init__(
        self,
        in_features,
        out_features,
        bias,
        num_experts,
        top_k,
        rank_of_router,
        rank_of_expert,
        routing=DEFAULT_ROUTING,
        temperature=1.0,
    ):
        super().__init__()
        self.set_routing(routing, temperature)
        self.routing_state = None  # a SmileRoutingState shared with the model's other SmileLinears, if any
        self.routing_parent = self.routing_layer = ""
        self._sequence_sum = self._sequence_count = None  # "sequence" routing: running sums per batch row
        self._leading_shape = None
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = min(top_k, num_experts)
        self.rank_of_router = rank_of_router
        # rank_of_expert: one rank for every expert, or one per expert; 0: dense experts
        ranks = [rank_of_expert] * num_experts if isinstance(rank_of_expert, int) else list(rank_of_expert)
        if len(ranks) != num_experts or (0 in ranks and any(ranks)) or min(ranks) < 0:
            raise ValueError(f"rank_of_expert {rank_of_expert!r}: one rank >= 1 per expert, or 0 (dense) for all")
        self.expert_ranks = tuple(ranks)
        self.rank_of_expert = ranks[0] if len(set(ranks)) == 1 else self.expert_ranks
        self.shared_linear = nn.Linear(in_features, out_features, bias=bias)
        if num_experts > 1:
            self.router = nn.Linear(in_features, num_experts * rank_of_router, bias=False)
        if ranks[0] > 0:
            self.experts_svh = nn.Parameter(torch.empty(sum(ranks), in_features))
            self.experts_u = nn.Parameter(torch.empty(out_features, sum(ranks)))
        else:
            self.experts_delta = nn.Parameter(torch.empty(num_experts * out_features, in_features))
        self.experts_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    @property
    def weight(self):
        """The base weight W0, for model code that reads a linear layer's `.weight` (e.g. its dtype)."""
        return self.shared_linear.weight

    @property
    def bias(self):
        return self.shared_linear.bias

    def set_routing(self, routing, temperature=1.0):
        if routing not in ROUTING_MODES:
            raise ValueError(f"unknown smile_routing {routing!r}; known: {', '.join(ROUTING_MODES)}")
        if not temperature > 0:
            raise ValueError(f"smile_routing_temperature must be > 0, got {temperature!r}")
        self.routing = routing
        self.temperature = float(temperature)

    def routing_weights(self, x):
        """(tokens, T) float32 weights of the experts added to each token of x (tokens, in)."""
        router_weight = self.router.weight if self.num_experts > 1 else None
        if self.routing == "faithful" or self.num_experts == 1:
            return smile_routing_weights(x, router_weight, self.num_experts, self.top_k)
        score, pool, tokens = ROUTING_MODES[self.routing]
        if score == "spectral":
            scores = spectral_scores(x, self.spectral_directions(), self.num_experts)
        elif score == "combined":
            scores = 0.5 * (
                projection_scores(x, router_weight, self.num_experts)
                + spectral_scores(x, self.spectral_directions(), self.num_experts)
            )
        else:
            scores = projection_scores(x, router_weight, self.num_experts)
        state = self.routing_state
        if tokens == "sequence":
            scores = self._sequence_scores(scores, state)
        elif tokens == "prompt":
            scores = self._prompt_scores(scores, state)
        if pool != "module" and state is not None:
            if pool == "model":
                key = "model"
            elif pool == "layer":
                key = ("layer", self.routing_layer)
            else:  # "input": the SmileLinears of one parent that read this very tensor
                key = ("input", self.routing_parent, x.data_ptr(), tuple(x.shape))
            scores = state.pool(key, scores)
        return top_k_weights(scores / self.temperature, self.top_k)

    def spectral_directions(self):
        """Stacked S_i V_i^T rows (T*g', in) of the experts' top g' = min(rank_of_router, k_1, ..., k_T) directions."""
        if self.expert_ranks[0] == 0:
            return self.experts_delta  # dW_i itself: all its directions, ||dW_i x|| = ||S_i V_i^T x||
        g = min(self.rank_of_router, *self.expert_ranks)
        return torch.cat([rows[:g] for rows in self.experts_svh.split(self.expert_ranks)])

    def _batch_view(self, scores, state):
        """scores as (B, L, T) and the mask (B, L) of real positions of the current forward pass."""
        shape = self._leading_shape
        batch, length = (1, scores.shape[0]) if shape is None or len(shape) < 2 else (shape[:-1].numel(), shape[-1])
        scores = scores.view(batch, length, -1)
        mask = state.mask if state is not None else None
        if mask is None or tuple(mask.shape) != (batch, length):
            mask = scores.new_ones(batch, length)
        return scores, mask.to(device=scores.device, dtype=scores.dtype), batch, length

    def _prompt_scores(self, scores, state):
        """Every position gets the mean of scores over the prompt's real positions (frozen after the prompt)."""
        scores, mask, batch, length = self._batch_view(scores, state)
        if state is not None:
            prompt_length = state.prompt_length
        else:  # on its own: an input with several positions is a new prompt
            prompt_length = length if length > 1 or self._sequence_sum is None else None
        if prompt_length is not None:
            mask = mask[:, :prompt_length].unsqueeze(-1)
            total = (scores[:, :prompt_length] * mask).sum(dim=1)
            count = mask.sum(dim=1)
            fallback = scores[:, :prompt_length].mean(dim=1)  # a row without real tokens (never in practice)
            self._sequence_sum = torch.where(count > 0, total / count.clamp_min(1), fallback)  # (B, T)
        mix = self._sequence_sum
        if mix is None or mix.shape[0] != batch:
            return scores.reshape(batch * length, -1)  # no prompt seen for this batch: the tokens' own scores
        return mix.unsqueeze(1).expand(batch, length, -1).reshape(batch * length, -1)

    def _sequence_scores(self, scores, state):
        """Causal running mean of scores over the sequence's real positions, carried across calls."""
        scores, mask, batch, length = self._batch_view(scores, state)
        fresh = state.fresh if state is not None else length > 1 or self._sequence_sum is None
        means, self._sequence_sum, self._sequence_count = sequence_mean(
            scores, self._sequence_sum, self._sequence_count, mask, fresh
        )
        return means.reshape(batch * length, -1)

    def forward(self, x):
        leading_shape = x.shape[:-1]
        self._leading_shape = leading_shape
        x = x.reshape(-1, self.in_features)
        y = self.shared_linear(x)
        weights = self.routing_weights(x)  # (tokens, T) float32
        if self.expert_ranks[0] > 0:
            hidden = F.linear(x, self.experts_svh)  # (tokens, K): every expert's k_i coordinates
            # scale each expert's coordinates by its routing weight, in place (no (tokens, K) weight copy when the
            # ranks are equal)
            if isinstance(self.rank_of_expert, int):
                hidden.view(-1, self.num_experts, self.rank_of_expert).mul_(weights.unsqueeze(-1).to(hidden.dtype))
            else:
                ranks = torch.tensor(self.expert_ranks, device=weights.device)
                hidden.mul_(weights.to(hidden.dtype).repeat_interleave(ranks, dim=1, output_size=hidden.shape[1]))
            y = y.addmm_(hidden, self.experts_u.T) if not y.requires_grad else y + F.linear(hidden, self.experts_u)
        else:
            updates = F.linear(x, self.experts_delta).view(-1, self.num_experts, self.out_features)
            y = y + (updates * weights.unsqueeze(-1).to(updates.dtype)).sum(dim=1)
        if self.experts_bias is not None:
            y = y + weights.to(self.experts_bias.dtype) @ self.experts_bias
        return y.view(*leading_shape, self.out_features)

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"rank_of_router={self.rank_of_router}, rank_of_expert={self.rank_of_expert}"
            + ("" if self.routing == DEFAULT_ROUTING else f", routing={self.routing}, temperature={self.temperature}")
        )


def module_ranks(config, name):
    """(rank_of_router, rank_of_expert) of the SmileLinear `name` (its checkpoint name): its smile_ranks entry
    (router rank, list of expert ranks), else the config's uniform ranks."""
    entry = (getattr(config, "smile_ranks", None) or {}).get(name)
    if entry is None:
        return config.rank_of_router, config.rank_of_expert
    return entry["router"], list(entry["experts"])


def upscale_linears(model, config):
    """Replace the nn.Linear modules named in config.smile_target_modules by (uninitialised) SmileLinear layers.

    The names are those of the checkpoint, i.e. of the architecture the model was planned on; a bare base
    model (e.g. MistralModel loading a MistralForCausalLM checkpoint) finds them under its base_model_prefix.
    """
    targets = set(config.smile_target_modules or ())
    prefix = model.base_model_prefix
    for name, module in list(model.named_modules()):
        checkpoint_name = name if name in targets else f"{prefix}.{name}"
        if checkpoint_name not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"smile_target_modules names '{name}', a {type(module).__name__}, not an nn.Linear")
        parent_name, _, child_name = name.rpartition(".")
        rank_of_router, rank_of_expert = module_ranks(config, checkpoint_name)
        smile = SmileLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            rank_of_router=rank_of_router,
            rank_of_expert=rank_of_expert,
        ).to(device=module.weight.device, dtype=module.weight.dtype)
        setattr(model.get_submodule(parent_name), child_name, smile)
    return model


_MODEL_CLASSES = {}


def smile_model_class(base_model_class):
    """base_model_class (a transformers model class) whose targeted linears are SmileLinear layers.

    Named `Smile` + the base class's name (SmileMistralForCausalLM, SmileT5ForConditionalGeneration, ...);
    its config class is the matching SMILE config class of configuration_smile.py.
    """
    name = "Smile" + base_model_class.__name__
    if name not in _MODEL_CLASSES:

        def __init__(self, config):
            base_model_class.__init__(self, config)
            upscale_linears(self, config)
            attach_smile_routing(self, config)

        namespace = {
            "__module__": __name__,
            "config_class": smile_config_class(base_model_class.config_class),
            # routing in float32, whatever dtype the model loads in
            "_keep_in_fp32_modules_strict": [*(base_model_class._keep_in_fp32_modules_strict or []), "router"],
            "__init__": __init__,
        }
        _MODEL_CLASSES[name] = type(name, (base_model_class,), namespace)
    return _MODEL_CLASSES[name]


def __getattr__(name):
    """`SmileX` for any model class `X` of the installed transformers (PEP 562); config.json's auto_map
    names the classes of its architecture, e.g. "modeling_smile.SmileMistralForCausalLM"."""
    base = getattr(transformers, name.removeprefix("Smile"), None) if name.startswith("Smile") else None
    if isinstance(base, type) and issubclass(base, PreTrainedModel):
        return smile_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def smile_linear_shapes(in_features, out_features, bias, num_experts, rank_of_router, rank_of_expert):
    """(parameter name, shape) of every tensor of a SmileLinear, in checkpoint order (the layout at the top of this
    file). rank_of_expert: one rank for every expert, or one per expert; 0: dense experts."""
    ranks = [rank_of_expert] * num_experts if isinstance(rank_of_expert, int) else list(rank_of_expert)
    shapes = [("shared_linear.weight", (out_features, in_features))]
    if bias:
        shapes.append(("shared_linear.bias", (out_features,)))
    if ranks[0] > 0:
        shapes += [("experts_svh", (sum(ranks), in_features)), ("experts_u", (out_features, sum(ranks)))]
    else:
        shapes.append(("experts_delta", (num_experts * out_features, in_features)))
    if bias:
        shapes.append(("experts_bias", (num_experts, out_features)))
    if num_experts > 1:
        shapes.append(("router.weight", (num_experts * rank_of_router, in_features)))
    return shapes
