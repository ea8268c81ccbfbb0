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
# experts are the dense task updates dWi themselves.
#
# Parameters of one SmileLinear, as stored in the checkpoint (all experts side by side, so that the
# forward pass is a few dense matmuls over every token, with no loop over tokens or experts):
#   shared_linear.weight  (out, in)         W0           shared_linear.bias  (out,)     b0
#   router.weight         (T*gate_k, in)    routers of experts 0..T-1 stacked; float32; absent when T = 1
#   experts_svh           (T*k, in)         svh_0; svh_1; ...      (low-rank experts)
#   experts_u             (out, T*k)        [u_0 | u_1 | ...]      (low-rank experts)
#   experts_delta         (T*out, in)       dW_0; dW_1; ...        (dense experts, rank_of_expert = 0)
#   experts_bias          (T, out)          b_i - b0; present when the base layer has a bias
#
# Models: for any transformers model class `X` (MistralForCausalLM, T5ForConditionalGeneration,
# CLIPVisionModel, ...) this module provides `SmileX`, built on first use: X whose nn.Linear modules named
# in config.smile_target_modules are SmileLinear layers. config.json's auto_map names the classes to use.
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
    probs = logits.softmax(dim=-1)
    if top_k >= num_experts:
        return probs
    kept, chosen = probs.topk(top_k, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, chosen, kept)


class SmileLinear(nn.Module):
    """A base nn.Linear plus T routed experts built from the fine-tuned models' task updates."""

    def __init__(self, in_features, out_features, bias, num_experts, top_k, rank_of_router, rank_of_expert):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = min(top_k, num_experts)
        self.rank_of_router = rank_of_router
        self.rank_of_expert = rank_of_expert
        self.shared_linear = nn.Linear(in_features, out_features, bias=bias)
        if num_experts > 1:
            self.router = nn.Linear(in_features, num_experts * rank_of_router, bias=False)
        if rank_of_expert > 0:
            self.experts_svh = nn.Parameter(torch.empty(num_experts * rank_of_expert, in_features))
            self.experts_u = nn.Parameter(torch.empty(out_features, num_experts * rank_of_expert))
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

    def routing_weights(self, x):
        """(tokens, T) float32 weights of the experts added to each token of x (tokens, in)."""
        router_weight = self.router.weight if self.num_experts > 1 else None
        return smile_routing_weights(x, router_weight, self.num_experts, self.top_k)

    def forward(self, x):
        leading_shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        y = self.shared_linear(x)
        weights = self.routing_weights(x)  # (tokens, T) float32
        if self.rank_of_expert > 0:
            hidden = F.linear(x, self.experts_svh)  # (tokens, T*k): every expert's k coordinates
            # scale each expert's k coordinates by its routing weight, in place (no (tokens, T*k) weight copy)
            hidden.view(-1, self.num_experts, self.rank_of_expert).mul_(weights.unsqueeze(-1).to(hidden.dtype))
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
        )


def upscale_linears(model, config):
    """Replace the nn.Linear modules named in config.smile_target_modules by (uninitialised) SmileLinear layers.

    The names are those of the checkpoint, i.e. of the architecture the model was planned on; a bare base
    model (e.g. MistralModel loading a MistralForCausalLM checkpoint) finds them under its base_model_prefix.
    """
    targets = set(config.smile_target_modules or ())
    prefix = model.base_model_prefix
    for name, module in list(model.named_modules()):
        if name not in targets and f"{prefix}.{name}" not in targets:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"smile_target_modules names '{name}', a {type(module).__name__}, not an nn.Linear")
        parent_name, _, child_name = name.rpartition(".")
        smile = SmileLinear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            rank_of_router=config.rank_of_router,
            rank_of_expert=config.rank_of_expert,
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
