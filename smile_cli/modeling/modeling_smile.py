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
#   router.calibrated_weight  (T, in)       routers fitted to example prompts (smile upscale --calibrate); float32;
#   router.calibrated_bias    (T,)          present when config.smile_calibrated_routers is true (and T > 1)
#   experts_svh           (K, in)           svh_0; svh_1; ...      (low-rank experts)
#   experts_u             (out, K)          [u_0 | u_1 | ...]      (low-rank experts)
#   experts_delta         (T*out, in)       dW_0; dW_1; ...        (dense experts, rank_of_expert = 0)
#   experts_bias          (T, out)          b_i - b0; present when the base layer has a bias
#
# Routing modes (config field `smile_routing`; data-free, no training, no extra parameters, but "calibrated"):
#
#   "faithful"         the paper's router above: every SmileLinear decides for every token on its own.
#                      Causal (the output at position t depends on tokens <= t only); padding plays no part.
#                      Works everywhere: KV cache, batches, beams, log-likelihood scoring, prefix caching,
#                      chunked prefill, and serving engines that pack several requests into one sequence.
#   "calibrated"       per token as faithful, with the routers `smile upscale --calibrate` fitted to a few example
#                      prompts per expert (ridge regression or class centroids over the base's inputs of each
#                      upscaled linear, smile_cli/calibrate.py): logits W x + b (router.calibrated_weight,
#                      router.calibrated_bias), then top_k_weights. Causal and works everywhere faithful does.
#   "prompt-model"     one expert mix per sequence, chosen from its prompt: each SmileLinear's normalised
#   "spectral-prompt"  score s_i(x) (below) is averaged over the prompt's real tokens, then over the
#   "combined-prompt"  SmileLinears called so far in the forward pass (layer l decides from the means of layers
#                      0..l); top_k_weights(mix / temperature, top_k) then routes every token of the sequence,
#                      prompt and generated tokens alike. NOT causal within the prompt (the first prompt token
#                      is routed by the whole prompt); causal after it (generated tokens only read the mix).
#   "likelihood-prompt" one expert per sequence, chosen by the model itself: the prompt is run once with each
#                      expert forced on every token, and the sequence gets the expert under which the model is most
#                      confident of the token after the prompt (the largest next-token log-probability at the last
#                      prompt token); the call then runs with it (its pass is the output and fills the KV cache).
#                      Costs T extra forward passes over the prompt (without a cache) at the first call of each
#                      sequence, no parameters; decoding steps cost as any mode. Same properties as prompt-model,
#                      and it needs the model's LM head (a ...ForCausalLM class). One expert, weight 1: top_k
#                      and the routing temperature play no part. Routing hooks see only the final pass (a
#                      returned tensor overrides it, as for any mode).
#
# Scores of the prompt modes (1 for a random x, so they are comparable between modules and can be pooled):
#   projection ("prompt-model")    s_i(x) = ||V_i^T x|| / (||x|| sqrt(g / in))             g = gate_k
#   spectral ("spectral-prompt")   s_i(x) = ||S_i V_i^T x|| / (||x|| ||S_i||_F / sqrt(in)) with the top
#                                  g' = min(gate_k, k_1..k_T) S-weighted directions (from experts_svh, or all of
#                                  dW_i's directions for dense experts)
#   combined ("combined-prompt")   the mean of the two
#   votes ("calibrated-prompt")    one_hot(argmax(W x + b)) of the calibrated routers: the mix is each expert's
#                                  share of the token votes, and top-1 the majority (needs --calibrate's routers)
#
# What "the prompt" is, derived from each forward call of the model (SmileRouting.from_call), per batch row:
#   - A call continues a sequence when it has a KV cache holding earlier tokens (the cache object is found by
#     type, whatever its argument is called: `cache` in transformers >= 5.x's generate(), `past_key_values`
#     before), or when `cache_position` / `position_ids` start after 0. A continuing call reads the mix its
#     cache recorded when the sequence started (the cache carries it; beams of one prompt share it, so beam
#     reordering keeps it valid). Later chat turns that reuse the cache keep the first prompt's mix.
#   - A call that starts a sequence pools over its prompt: inside generate() the prompt is the generate()
#     input (the model's generate records its length), so generation without the cache (every step recomputes
#     the whole sequence) routes exactly as with the cache; outside generate() it is the whole input (so in
#     log-likelihood scoring the scored continuation takes part in its own routing).
#   - Real tokens: the 2D attention mask when given; otherwise every token except the leading and trailing
#     runs of the pad token (config.pad_token_id, else generation_config.pad_token_id): left and right
#     padding, with or without a mask, give each row the mix it has alone.
#   - Serving engines that pack several requests into one sequence (vLLM's transformers backend) or keep the
#     KV cache outside transformers: a prompt mode cannot route there (it would mix requests, or find no mix
#     to continue with). vLLM is recognised when it builds the model (its Transformers backend sets the config's
#     attention implementation to "vllm", its own attention over its own KV cache, before instantiating the
#     class): there a prompt mode is replaced by config.smile_engine_routing when the folder names one (`smile
#     upscale --routing auto` writes "faithful" beside the prompt mode it chose), with a warning; otherwise it is
#     refused at load time, in one message saying how to serve it (see _engine_routing). Elsewhere the model
#     raises SmileRoutingError naming the mode at the first call it cannot route, instead of mixing requests.
#     Serve such models with `faithful`, e.g.
#     `AutoModel...from_pretrained(folder, smile_routing="faithful")`, vLLM's hf_overrides={"smile_routing":
#     "faithful"}, or `smile serve FOLDER --routing faithful`.
#   Prompt modes need a decoder-only causal LM (prompt_routing_support says which architectures are). `smile
#   upscale --routing auto`, the default, picks likelihood-prompt for a decoder-only causal LM (it keeps the most of
#   the experts' skill on a real pretrained LM) and writes smile_engine_routing "faithful" for serving engines;
#   faithful for every other architecture; calibrated with --calibrate.
#
# Observing and overriding routing: model.register_routing_hook(fn) calls fn(name, weights) after every
# router decides, weights (batch..., T) float32 for the tokens of SmileLinear `name`; a tensor returned by
# fn replaces them (e.g. oracle routing). Returns a handle with .remove().
#
# Models: for any transformers model class `X` (MistralForCausalLM, T5ForConditionalGeneration,
# CLIPVisionModel, ...) this module provides `SmileX`, built on first use: X whose nn.Linear modules named
# in config.smile_target_modules are SmileLinear layers. config.json's auto_map names the classes to use.
import contextvars
import functools
import itertools

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .configuration_smile import smile_config_class

# ---------------------------------------------------------------------------------------------------------
# Layout: what a SmileLinear stores, per module (the parameters of the header's table).


def smile_linear_shapes(in_features, out_features, bias, num_experts, rank_of_router, rank_of_expert, calibrated=False):
    """(parameter name, shape) of every tensor of a SmileLinear, in checkpoint order (the layout at the top of this
    file). rank_of_expert: one rank for every expert, or one per expert; 0: dense experts. calibrated: with the
    routers of `smile upscale --calibrate`."""
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
        if calibrated:
            shapes += [
                ("router.calibrated_weight", (num_experts, in_features)),
                ("router.calibrated_bias", (num_experts,)),
            ]
    return shapes


def module_ranks(config, name):
    """(rank_of_router, rank_of_expert) of the SmileLinear `name` (its checkpoint name): its smile_ranks entry
    (router rank, list of expert ranks), else the config's uniform ranks."""
    entry = (getattr(config, "smile_ranks", None) or {}).get(name)
    if entry is None:
        return config.rank_of_router, config.rank_of_expert
    return entry["router"], list(entry["experts"])


# ---------------------------------------------------------------------------------------------------------
# Routing modes: the values of config.smile_routing (here, as the layer's and router's arguments default to one).

# name: (score, pool) of a prompt mode ("faithful": the paper's per-token router, no pooling). score: the per-token
# scores of the header (SmileRouter.scores); pool: how one router pools them over the prompt's tokens (POOLS), or
# "likelihood": the expert is chosen from the model's own next-token distribution under each expert (no scores).
ROUTING_MODES = {
    "faithful": None,
    "calibrated": None,  # per token, with routers fitted to example prompts (calibrated_routing_weights)
    "prompt-model": ("projection", "mean"),
    "spectral-prompt": ("spectral", "mean"),
    "combined-prompt": ("combined", "mean"),
    "likelihood-prompt": (None, "likelihood"),
    "calibrated-prompt": ("votes", "mean"),  # the prompt modes' pooling of the calibrated routers' per-token votes
}
DEFAULT_ROUTING = "faithful"  # a config without smile_routing (outputs older than the routing modes)
PER_TOKEN_ROUTING = ("faithful", "calibrated")  # each SmileLinear routes each token alone: no call state, causal
# Modes of earlier releases, dominated on docs/results/routing.md; folders built with one keep their own copy
# of this file, which still implements it.
REMOVED_ROUTING_MODES = (
    "normalized", "input", "layer", "model", "sequence", "sequence-model", "spectral", "spectral-model",
    "spectral-sequence", "prompt",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Layer: the SmileLinear that replaces each targeted nn.Linear.


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
        calibrated=False,
    ):
        super().__init__()
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
        self.router = (
            SmileRouter(in_features, num_experts, rank_of_router, self.top_k, routing, temperature, calibrated)
            if num_experts > 1
            else None
        )
        # the experts' own tensors, laid out by smile_linear_shapes (shared_linear and router are submodules)
        self.experts_bias = None
        for name, shape in smile_linear_shapes(in_features, out_features, bias, num_experts, rank_of_router, ranks):
            if "." not in name:
                setattr(self, name, nn.Parameter(torch.empty(shape)))

    @property
    def weight(self):
        """The base weight W0, for model code that reads a linear layer's `.weight` (e.g. its dtype)."""
        return self.shared_linear.weight

    @property
    def bias(self):
        return self.shared_linear.bias

    def spectral_directions(self):
        """Stacked S_i V_i^T rows (T*g', in) of the experts' top g' = min(rank_of_router, k_1, ..., k_T) directions."""
        if self.expert_ranks[0] == 0:
            return self.experts_delta  # dW_i itself: all its directions, ||dW_i x|| = ||S_i V_i^T x||
        g = min(self.rank_of_router, *self.expert_ranks)
        return torch.cat([rows[:g] for rows in self.experts_svh.split(self.expert_ranks)])

    def forward(self, x):
        if self.router is None:
            weights = x.new_ones(*x.shape[:-1], 1, dtype=torch.float32)
        else:
            weights = self.router(x, self.spectral_directions() if self.router.needs_directions else None)
        leading_shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        weights = weights.reshape(-1, self.num_experts)  # (tokens, T) float32
        y = self.shared_linear(x)
        active = self._active_experts(weights) if not y.requires_grad and self.expert_ranks[0] > 0 else None
        if active is not None:
            # some experts have weight 0 for every token (top-k routing of one token, or of a prompt mode's
            # sequence): only the others' factors are read, as the sum over all experts would add exact zeros
            offsets = [0, *itertools.accumulate(self.expert_ranks)]
            for i in active:
                rows = slice(offsets[i], offsets[i + 1])
                hidden = F.linear(x, self.experts_svh[rows]).mul_(weights[:, i : i + 1].to(x.dtype))
                y = y.addmm_(hidden, self.experts_u[:, rows].T)
        elif self.expert_ranks[0] > 0:
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

    def _active_experts(self, weights):
        """The experts with a nonzero weight for some token, when that is not all of them; else None."""
        if self.num_experts == 1:
            return None
        used = weights.ne(0).any(dim=0)
        if bool(used.all()):
            return None
        return used.nonzero().flatten().tolist()

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, "
            f"rank_of_router={self.rank_of_router}, rank_of_expert={self.rank_of_expert}"
        )


# ---------------------------------------------------------------------------------------------------------
# Router: a SmileLinear's routing weights, per token or per prompt, and which models a prompt mode can route.


class SmileRouter(nn.Module):
    """The routing of one SmileLinear: its router rows V_i^T (T*gate_k, in) and the model's routing mode.

    forward(x (..., in), directions) -> weights (..., T) in float32; directions are the layer's S-weighted
    expert directions, used by the spectral scores only. Forward hooks on it see (and may replace) every
    routing decision; SmileModel.register_routing_hook installs one on each router of a model.
    """

    def __init__(
        self,
        in_features,
        num_experts,
        rank_of_router,
        top_k,
        routing=DEFAULT_ROUTING,
        temperature=1.0,
        calibrated=False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts * rank_of_router, in_features))
        if calibrated:  # the routers fitted by `smile upscale --calibrate` (routing "calibrated")
            self.calibrated_weight = nn.Parameter(torch.empty(num_experts, in_features))
            self.calibrated_bias = nn.Parameter(torch.empty(num_experts))
        self.num_experts, self.top_k = num_experts, top_k
        self.name = ""  # the SmileLinear's name in its model (the key of its recorded prompt mix)
        self.set_routing(routing, temperature)

    def set_routing(self, routing, temperature=1.0):
        if routing in REMOVED_ROUTING_MODES:
            raise ValueError(
                f"smile_routing {routing!r} was removed (dominated, docs/results/routing.md); a folder built with "
                f"it keeps its own modeling_smile.py, which still implements it. Known: {', '.join(ROUTING_MODES)}"
            )
        if routing not in ROUTING_MODES:
            raise ValueError(f"unknown smile_routing {routing!r}; known: {', '.join(ROUTING_MODES)}")
        if not temperature > 0:
            raise ValueError(f"smile_routing_temperature must be > 0, got {temperature!r}")
        if routing in ("calibrated", "calibrated-prompt") and not hasattr(self, "calibrated_weight"):
            raise ValueError(
                f"smile_routing {routing!r} needs the routers `smile upscale --calibrate` fits; this model has none "
                "(config.json smile_calibrated_routers): use faithful"
            )
        self.routing, self.temperature = routing, float(temperature)

    @property
    def needs_directions(self):
        mode = ROUTING_MODES[self.routing]
        return mode is not None and mode[0] in ("spectral", "combined")

    def scores(self, x, directions):
        """(tokens, T) normalised scores of x (tokens, in) for the prompt modes."""
        score = ROUTING_MODES[self.routing][0]
        if score == "projection":
            return projection_scores(x, self.weight, self.num_experts)
        if score == "spectral":
            return spectral_scores(x, directions, self.num_experts)
        if score == "votes":
            logits = torch.addmm(self.calibrated_bias.float(), x.float(), self.calibrated_weight.float().T)
            return F.one_hot(logits.argmax(dim=-1), self.num_experts).float()
        projection = projection_scores(x, self.weight, self.num_experts)
        return 0.5 * (projection + spectral_scores(x, directions, self.num_experts))

    def forward(self, x, directions=None):
        leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        call = _CALL.get()
        if self.routing == "faithful":
            weights = smile_routing_weights(flat, self.weight, self.num_experts, self.top_k)
        elif self.routing == "calibrated":
            weights = calibrated_routing_weights(flat, self.calibrated_weight, self.calibrated_bias, self.top_k)
        elif call is None or x.dim() != 3 or tuple(leading) != (call.batch, call.length):
            raise SmileRoutingError(
                f"{self.routing} routing runs inside a forward call of its model (a token grid of "
                f"{tuple(leading)} is not the call's); use the model, or smile_routing='faithful'"
            )
        else:  # a call that continues its sequences reads the recorded mix: no scores to compute
            pool = ROUTING_MODES[self.routing][1]
            if pool == "likelihood":  # the chosen experts' weights themselves (forced, or recorded)
                mix = call.mix(self.name, None)
            else:
                scores = self.scores(flat, directions).view(*leading, self.num_experts) if call.fresh else None
                mix = top_k_weights(call.mix(self.name, scores, POOLS[pool]) / self.temperature, self.top_k)
            weights = mix.unsqueeze(1).expand(*leading, -1)
        return weights.reshape(*leading, self.num_experts)

    def extra_repr(self):
        return f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.routing}" + (
            "" if self.routing in PER_TOKEN_ROUTING else f", temperature={self.temperature}"
        )


def smile_routing_weights(x, router_weight, num_experts, top_k):
    """The paper's routing weights (tokens, T) in float32: the kept experts' renormalised softmax weights.

    x: (tokens, in). router_weight: (T*gate_k, in), experts' router rows stacked in order.
    """
    if num_experts == 1:
        return x.new_ones(x.shape[0], 1, dtype=torch.float32)
    projections = F.linear(x.float(), router_weight.float())  # (tokens, T*gate_k)
    logits = projections.view(x.shape[0], num_experts, -1).norm(dim=-1)  # (tokens, T)
    return top_k_weights(logits, top_k)


def calibrated_routing_weights(x, weight, bias, top_k):
    """(tokens, T) float32 routing weights of the calibrated routers: top_k_weights(W x + b).

    x: (tokens, in). weight: (T, in) and bias: (T,), fitted by `smile upscale --calibrate`.
    """
    return top_k_weights(torch.addmm(bias.float(), x.float(), weight.float().T), top_k)


def top_k_weights(logits, top_k):
    """softmax(logits) over the last dim; keep the top_k; renormalise the kept weights to sum to 1."""
    probs = logits.softmax(dim=-1)
    if top_k >= probs.shape[-1]:
        return probs
    kept, chosen = probs.topk(top_k, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, chosen, kept)


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


def pool_mean(scores, prompt):
    """(B, T) mean of scores (B, L, T) over each row's prompt tokens (prompt (B, L) bool; a row with none: all)."""
    mask = prompt.unsqueeze(-1)
    count = mask.sum(dim=1)
    total = torch.where(mask, scores, 0).sum(dim=1)  # padding left out even where its scores are not finite
    return torch.where(count > 0, total / count.clamp_min(1), scores.mean(dim=1))


POOLS = {"mean": pool_mean}


class SmileRoutingError(RuntimeError):
    """A forward call that the model's routing mode cannot route correctly."""


def prompt_routing_support(model_type, class_name, is_encoder_decoder):
    """(whether the prompt modes can route a model of this architecture, why in a few words).

    They need a decoder-only causal LM: forward calls that take token ids, routed left to right with an
    optional KV cache. That is a class transformers' AutoModelForCausalLM maps model_type to, of a model_type
    with no encoder-decoder (seq2seq) or masked-LM class (BERT-like encoders also have a causal-LM class), and
    a config that is not encoder-decoder. model_type and class_name: the base's (`llama`, `LlamaForCausalLM`).
    """
    from transformers.models.auto import modeling_auto

    if is_encoder_decoder or model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return False, f"{class_name} is an encoder-decoder model"
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False, f"{class_name} is an encoder architecture's ({model_type}), not a decoder-only causal LM"
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if class_name not in ((causal,) if isinstance(causal, str) else causal or ()):
        return False, f"{class_name} is not a causal LM"
    return True, f"{class_name} is a decoder-only causal LM"


# Attention implementations of serving engines whose KV cache lives outside transformers and whose forward calls
# pack the scheduled tokens of many requests into one sequence (vLLM's Transformers backend registers "vllm" and
# sets it on the config before it instantiates the model class).
ENGINE_ATTENTION = {"vllm": "vLLM"}


def _engine_routing(config, routing):
    """The routing a model built with prompt mode `routing` runs: `routing` itself, unless a serving engine builds
    it. A prompt mode could not route an engine's packed batches, so there the folder's engine routing
    (config.smile_engine_routing, a per-token mode) replaces it, with a warning; without one it is refused at load
    time (SmileRoutingError) rather than at the first request."""
    engine = ENGINE_ATTENTION.get(getattr(config, "_attn_implementation", None))
    if engine is None:
        return routing
    fallback = getattr(config, "smile_engine_routing", None)
    if fallback in PER_TOKEN_ROUTING:
        transformers.logging.get_logger(__name__).warning(
            f"SMILE: {engine} serves this model with smile_routing {fallback!r} (config.json smile_engine_routing): "
            f"{routing!r} chooses one expert mix per request, which {engine} cannot keep per request"
        )
        return fallback
    raise SmileRoutingError(
        f"smile_routing {routing!r} cannot be served by {engine} (it packs requests into one sequence and keeps "
        f"the KV cache itself, so one prompt's expert mix cannot be kept per request): serve this folder with "
        f'faithful routing (hf_overrides={{"smile_routing": "faithful"}}, or `smile serve FOLDER --routing '
        f"faithful`), or run it with transformers"
    )


# ---------------------------------------------------------------------------------------------------------
# What one forward call of the model is, for routing (prompt modes only; faithful routing needs none of it).

_CALL = contextvars.ContextVar("smile_routing_call", default=None)  # the SmileRouting of the running call
_GENERATE_PROMPT = contextvars.ContextVar("smile_generate_prompt", default=None)  # generate()'s input length
_CACHE_ATTRIBUTE = "smile_prompt_mix"  # {router name: (B, T) mix}, set on the cache object of a sequence


def _padding(ids, pad_token_id):
    """(B, L) bool: the leading and trailing runs of pad_token_id in each row of ids."""
    is_pad = ids == pad_token_id
    leading = is_pad.long().cumprod(dim=1).bool()
    trailing = is_pad.flip(1).long().cumprod(dim=1).bool().flip(1)
    return leading | trailing


def _find_cache(args, kwargs):
    """The KV cache object of a call, whatever its argument is called (cache=, past_key_values=, positional)."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


class SmileRouting:
    """One forward call of a model with a prompt routing mode: which positions are real tokens of the prompt,
    whether the call starts a sequence or continues one, and the per-module means pooled so far."""

    def __init__(self, batch, length, prompt, cache, fresh):
        self.batch, self.length = batch, length
        self.prompt = prompt  # (B, L) bool: the real prompt tokens of this call (used when fresh)
        self.cache = cache  # the call's KV cache object, or None
        self.fresh = fresh  # True: the call starts its sequences; False: it continues them
        self.pool_sum, self.pool_count = None, 0  # running sum of the module means, over modules called so far
        self.recorded = {}  # router name -> (B, T) mix, when fresh: attached to the call's KV cache afterwards
        self.forced = None  # (B, T) weights every router gives each row (likelihood-prompt: the chosen experts)
        self.scoring = False  # True during likelihood-prompt's passes under each expert (hooks skip them)

    @classmethod
    def from_call(cls, model, args, kwargs):
        """Derive the routing state of a call of a decoder-only model from its inputs (see the file header)."""
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if tokens is None or tokens.dim() < 2:
            raise SmileRoutingError(f"{model.config.smile_routing} routing needs input_ids or inputs_embeds")
        batch, length = tokens.shape[:2]
        device = tokens.device
        cache = _find_cache(args, kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        cache_position = kwargs.get("cache_position")
        if cache is None and cache_position is not None and cache_position.numel():
            past = int(cache_position.flatten()[0])
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2:
            real = mask[:, -length:].to(device).bool()
        else:
            pad = model.config.pad_token_id
            generation_config = getattr(model, "generation_config", None)  # none on a model without a head
            if pad is None and generation_config is not None:
                pad = generation_config.pad_token_id
            pad = pad[0] if isinstance(pad, list | tuple) else pad
            if ids is not None and pad is not None:
                real = ~_padding(ids, pad)
            else:
                real = torch.ones(batch, length, dtype=torch.bool, device=device)
        position_ids = kwargs.get("position_ids")
        if torch.is_tensor(position_ids) and position_ids.dim() == 2 and position_ids.shape[-1] == length:
            positions = position_ids.expand(batch, -1).to(device)
            steps = positions[:, 1:] - positions[:, :-1]
            if ((steps != 1) & real[:, 1:] & real[:, :-1]).any():
                raise SmileRoutingError(
                    f"{model.config.smile_routing} routing: the position ids restart inside a row, so the row packs "
                    "several sequences (a serving engine that flattens requests); a prompt mode would mix them. "
                    "Load the model with smile_routing='faithful' to serve it this way."
                )
            if cache is None and past == 0:  # a continuation whose KV cache lives outside transformers
                first = torch.where(real, positions, positions.new_full((), 2**62)).amin(dim=1)
                if (first[real.any(dim=1)] > 0).any():
                    past = int(first.max())
        fresh = past == 0
        prompt = real
        prompt_length = _GENERATE_PROMPT.get()
        if fresh and prompt_length is not None and prompt_length < length:  # generate() without the cache
            prompt = real & (torch.arange(length, device=device) < prompt_length)
        if not fresh and (cache is None or getattr(cache, _CACHE_ATTRIBUTE, None) is None):
            raise SmileRoutingError(
                f"{model.config.smile_routing} routing: this call continues a sequence ({past} earlier tokens) "
                "whose prompt this model did not see (no KV cache from its first forward pass); serving engines "
                "that keep their own KV cache need smile_routing='faithful'."
            )
        return cls(batch, length, prompt, cache, fresh)

    def mix(self, name, scores, pool=pool_mean):
        """(B, T) expert mix of router `name` from its scores (B, L, T) of this call: pooled over the prompt's
        real tokens by pool (POOLS), then averaged over the modules called so far, when the call starts the
        sequences; else the recorded mix (scores: None). Under a chosen expert (self.forced) that choice."""
        if not self.fresh:
            recorded = getattr(self.cache, _CACHE_ATTRIBUTE)
            if name not in recorded or recorded[name].shape[0] != self.batch:
                raise SmileRoutingError(
                    f"prompt routing: the KV cache holds no mix for {name} at batch size {self.batch} "
                    "(it was filled by a different model or batch)"
                )
            return recorded[name]
        if self.forced is not None:
            mix = self.forced
        else:
            pooled = pool(scores, self.prompt)
            self.pool_sum = pooled if self.pool_sum is None else self.pool_sum + pooled
            self.pool_count += 1
            mix = self.pool_sum / self.pool_count
        self.recorded[name] = mix
        return mix


# ---------------------------------------------------------------------------------------------------------
# Surgery and models: the SmileX classes, whose targeted linears are SmileLinear layers.


def upscale_linears(model, config):
    """Replace the nn.Linear modules named in config.smile_target_modules by (uninitialised) SmileLinear layers.

    The names are those of the checkpoint, i.e. of the architecture the model was planned on; a bare base
    model (e.g. MistralModel loading a MistralForCausalLM checkpoint) finds them under its base_model_prefix.
    """
    targets = set(config.smile_target_modules or ())
    prefix = model.base_model_prefix
    routing = getattr(config, "smile_routing", None) or DEFAULT_ROUTING
    temperature = float(getattr(config, "smile_routing_temperature", None) or 1.0)
    calibrated = bool(getattr(config, "smile_calibrated_routers", False))
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
            routing=routing,
            temperature=temperature,
            calibrated=calibrated,
        ).to(device=module.weight.device, dtype=module.weight.dtype)
        if smile.router is not None:
            smile.router.name = checkpoint_name
        setattr(model.get_submodule(parent_name), child_name, smile)
    return model


class _Handles:
    """The handles of one register_routing_hook call; remove() removes them all."""

    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


class SmileModel:
    """What every SmileX class adds to its transformers base class X (mixed in before X)."""

    def register_routing_hook(self, hook):
        """Call hook(name, weights) after each router of the model decides: name is the SmileLinear's checkpoint
        name, weights its (batch..., T) float32 routing weights; a tensor returned replaces them. Returns a
        handle whose remove() uninstalls the hook."""

        def on_router(router, args, weights):
            call = _CALL.get()
            if call is not None and call.scoring:  # likelihood-prompt's passes under each expert: not a decision
                return None
            return hook(router.name, weights)

        return _Handles([m.register_forward_hook(on_router) for m in self.modules() if isinstance(m, SmileRouter)])


def _choose_by_likelihood(model, base_forward, call, args, kwargs):
    """(B, T) one-hot weights: for each row, the expert under which the model is most confident of the token that
    follows its prompt (the largest next-token log-probability at the row's last prompt token), with each expert in
    turn forced on every token (T extra forward passes over the call's input, without a KV cache; routing hooks do
    not see them)."""
    n = model.config.num_local_experts
    scoring = {k: v for k, v in kwargs.items() if not isinstance(v, Cache) and k != "labels"}
    scoring["use_cache"] = False
    if "logits_to_keep" in scoring:
        scoring["logits_to_keep"] = 0  # every position: the last prompt token is not the last one without a cache
    if "return_dict" in scoring:
        scoring["return_dict"] = True  # the logits by name
    args = tuple(a for a in args if not isinstance(a, Cache))
    positions = torch.arange(call.length, device=call.prompt.device)
    last = torch.where(call.prompt, positions, -1).amax(dim=1)
    last = torch.where(last >= 0, last, call.length - 1)  # a row with no prompt token: its last position
    rows = torch.arange(call.batch, device=last.device)
    confidence = []
    call.scoring = True
    try:
        for expert in range(n):
            call.forced = F.one_hot(torch.full((call.batch,), expert, device=last.device), n).float()
            output = base_forward(model, *args, **scoring)
            logits = getattr(output, "logits", None)
            if logits is None:
                raise SmileRoutingError(
                    f"{model.config.smile_routing} routing needs the model's language-model head (its next-token "
                    f"logits); {type(model).__name__} has none: load the folder as a causal LM, or use another mode"
                )
            confidence.append(logits[rows, last].float().log_softmax(dim=-1).amax(dim=-1))
    finally:
        call.scoring = False
    call.recorded = {}
    return F.one_hot(torch.stack(confidence, dim=1).argmax(dim=1), n).float()


def _routed_forward(base_forward):
    """The base class's forward, run with the SmileRouting of the call when the model uses a prompt mode; the
    mixes a call records travel on its KV cache (the one passed in, or the one the model created)."""

    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        routing = getattr(self.config, "smile_routing", None) or DEFAULT_ROUTING
        if routing in PER_TOKEN_ROUTING or self.config.num_local_experts == 1 or _CALL.get() is not None:
            return base_forward(self, *args, **kwargs)
        call = SmileRouting.from_call(self, args, kwargs)
        token = _CALL.set(call)
        try:
            if call.fresh and ROUTING_MODES[routing][1] == "likelihood":
                call.forced = _choose_by_likelihood(self, base_forward, call, args, kwargs)
            output = base_forward(self, *args, **kwargs)
        finally:
            _CALL.reset(token)
        if call.fresh:
            values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
            for cache in (v for v in values if isinstance(v, Cache)):
                setattr(cache, _CACHE_ATTRIBUTE, call.recorded)
        return output

    return forward


def _generate_with_prompt(base_generate):
    """The base class's generate(), recording the prompt's length so that prompt routing finds the prompt in
    steps that recompute the whole sequence (use_cache=False)."""

    @functools.wraps(base_generate)
    def generate(self, *args, **kwargs):
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        token = _GENERATE_PROMPT.set(prompt.shape[1] if torch.is_tensor(prompt) and prompt.dim() > 1 else None)
        try:
            return base_generate(self, *args, **kwargs)
        finally:
            _GENERATE_PROMPT.reset(token)

    return generate


_MODEL_CLASSES = {}


def smile_model_class(base_model_class):
    """base_model_class (a transformers model class) whose targeted linears are SmileLinear layers.

    Named `Smile` + the base class's name (SmileMistralForCausalLM, SmileT5ForConditionalGeneration, ...);
    its config class is the matching SMILE config class of configuration_smile.py.
    """
    name = "Smile" + base_model_class.__name__
    if name not in _MODEL_CLASSES:

        def __init__(self, config):
            routing = getattr(config, "smile_routing", None) or DEFAULT_ROUTING
            if routing not in PER_TOKEN_ROUTING:  # the architecture the folder was built from, else this class
                built = (getattr(config, "architectures", None) or [base_model_class.__name__])[0]
                model_type = getattr(config, "base_model_type", config.model_type)
                is_encoder_decoder = getattr(config, "is_encoder_decoder", False)
                supported, why = prompt_routing_support(model_type, built.removeprefix("Smile"), is_encoder_decoder)
                if not supported:
                    raise ValueError(f"smile_routing {routing!r} needs a decoder-only causal LM ({why}); use faithful")
                config.smile_routing = _engine_routing(config, routing)
            base_model_class.__init__(self, config)
            upscale_linears(self, config)

        namespace = {
            "__module__": __name__,
            "config_class": smile_config_class(base_model_class.config_class),
            # routing in float32, whatever dtype the model loads in
            "_keep_in_fp32_modules_strict": [*(base_model_class._keep_in_fp32_modules_strict or []), "router"],
            "__init__": __init__,
            "forward": _routed_forward(base_model_class.forward),
        }
        if hasattr(base_model_class, "generate"):
            namespace["generate"] = _generate_with_prompt(base_model_class.generate)
        _MODEL_CLASSES[name] = type(name, (SmileModel, base_model_class), namespace)
    return _MODEL_CLASSES[name]


def __getattr__(name):
    """`SmileX` for any model class `X` of the installed transformers (PEP 562); config.json's auto_map
    names the classes of its architecture, e.g. "modeling_smile.SmileMistralForCausalLM"."""
    base = getattr(transformers, name.removeprefix("Smile"), None) if name.startswith("Smile") else None
    if isinstance(base, type) and issubclass(base, PreTrainedModel):
        return smile_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
