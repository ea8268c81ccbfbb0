"""Benchmark-only routing variants of a loaded SMILE model (issue 13 item 4: moved out of modeling_smile.py).

    model = tiny.load(folder)                 # any SMILE model (its config's routing is replaced)
    routing_variants.install(model, "sequence-model")

modeling_smile.py keeps the routing modes that docs/results/routing.md selects (faithful and the three prompt
modes). The dominated variants of earlier releases, whose numbers routing.md still reports, and the causal modes
of the routing research (routing_discussion.md) live here. They only compute routing weights: install() swaps
every SmileLinear's router for a VariantRouter (a subclass of the model's own SmileRouter, sharing its weight, so
the model's routing hook sees it), PEFT-style; the layer math stays the model's. Each variant is
(score, pool, tokens), as in modeling_smile.py before issue 13:

  score   "projection"  s_i(x) = ||V_i^T x|| / (||x|| sqrt(g / in))      (the model file's projection_scores)
          "spectral"    s_i(x) = ||S_i V_i^T x|| / (||x|| ||S_i||_F / sqrt(in))            (spectral_scores)
  pool    "module"      each SmileLinear on its own
          "input"       running mean over the SmileLinears of one parent that read the same input tensor (q/k/v;
                        gate/up), in call order
          "layer"       running mean over the SmileLinears of one decoder layer called so far (same token)
          "model"       running mean over every SmileLinear called so far in the forward pass (same token)
  tokens  "token"       each token on its own
          "sequence"    causal running mean over the sequence's real tokens up to the current one, carried across
                        generate() steps on the KV cache (causal)
          "prompt"      mean over the prompt's real tokens, frozen for the sequence (not causal in the prompt)
  weights top_k_weights(pooled / temperature, top_k)

"normalized" (projection, module, token) differs from faithful only by a positive factor per token on the
softmax logits (1 / (||x|| sqrt(g / in))): the same order of experts, so with top-1 routing (the benchmark's) it
routes exactly as faithful; it differs only in the kept weights when top_k > 1.

Causal research modes (tokens "causal", model pool; see routing_discussion.md): each module routes token t with
the causal running mean, over the real tokens <= t, of its model-pooled per-token scores (the same as
"sequence-model" with the defaults), changed by the options of RESEARCH[name]:
          weight        "equal", or "margin": each token counts with its own margin (top - second pooled score)
          skip_first    the first real token (BOS: the same for every task) stays out of the mean
          first         how the first real token routes: "own" (its own scores), "uniform" (weight 1/T to every
                        expert: the merged model), "base" (no expert)
          commit        None, or a margin: every expert gets weight 1/T (the merged model) until the running
                        mean's margin between its top two experts reaches it, then top-k as usual
          decay         None, or r < 1: an exponential moving mean (token j counts r^(n - j) at the n-th real token)
          layers        "all": the model pool of every module called so far (layer l: layers 0..l); "first": every
                        module routes with the pool of the first decoder layer's modules (the most accurate
                        router, docs/results/routing.md's per-layer table)

Which tokens of a call are real, whether it starts or continues its sequences, and what its prompt is, comes from
the model file's own SmileRouting.from_call (one home for that logic); the per-sequence state rides on the KV
cache in the slot the model file uses for its prompt mixes. Beams (row reordering) are not tracked: the
benchmark decodes greedily.
"""

import contextlib
import contextvars
import functools
import re
import sys

import torch

VARIANTS = {
    # name: (score, pool, tokens); the kept modes (faithful, prompt-model, spectral-prompt, combined-prompt) are
    # the model file's own and are selected with `smile upscale --routing`
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
}
# causal research modes: name -> options (see the module docstring); score "projection" unless named spectral-*
RESEARCH = {
    "causal-skip-bos": dict(skip_first=True),
    "causal-uniform-bos": dict(skip_first=True, first="uniform"),
    "causal-base-bos": dict(skip_first=True, first="base"),
    "confident": dict(weight="margin", skip_first=True),
    "commit-0.02": dict(skip_first=True, commit=0.02),
    "commit-0.1": dict(skip_first=True, commit=0.1),
    "decay-0.6": dict(skip_first=True, decay=0.6),
    "first-layer": dict(skip_first=True, layers="first"),
    "first-layer-base-bos": dict(skip_first=True, layers="first", first="base"),
}
RESEARCH.update({f"spectral-{name}": options for name, options in list(RESEARCH.items())})
VARIANTS.update(
    {name: ("spectral" if name.startswith("spectral-") else "projection", "model", "causal") for name in RESEARCH}
)
CAUSAL = {name for name, (_, _, tokens) in VARIANTS.items() if tokens != "prompt"}

_CALL = contextvars.ContextVar("routing_variant_call", default=None)


def _modeling(model):
    """The model's own modeling_smile module (the folder's copy, loaded by trust_remote_code)."""
    return sys.modules[type(model).__module__]


class VariantCall:
    """One forward call of a model whose routers are VariantRouters: the model file's SmileRouting of the call,
    the real-token mask, the per-sequence state (carried on the KV cache) and the per-call module pools."""

    def __init__(self, model, routing):
        self.routing = routing
        self.batch, self.length = routing.batch, routing.length
        modeling = _modeling(model)
        if routing.fresh:
            real = routing.prompt
            prompt_length = modeling._GENERATE_PROMPT.get()
            if prompt_length is not None and prompt_length < self.length:  # generate() without the cache:
                real = real | (torch.arange(self.length, device=real.device) >= prompt_length)  # + generated
            self.real = real
            self.state = {}
        else:
            self.real = routing.prompt
            self.state = getattr(routing.cache, modeling._CACHE_ATTRIBUTE)
        self.pools = {}
        self.first_layer, self.research_weights = None, None  # research modes with layers="first"

    def real_index(self, name):
        """(B, L) index of each position among its sequence's real tokens (carried across calls)."""
        key = (name, "index")
        carried = self.state.get(key)
        index = self.real.long().cumsum(dim=1) - 1 + (0 if carried is None else carried.unsqueeze(1))
        self.state[key] = index[:, -1] + 1
        return index.clamp_min(0).float()

    def pool(self, key, scores):
        """Running mean of scores (B, L, T) over the modules of pool `key` called so far in this call."""
        entry = self.pools.get(key)
        total, count = (scores, 1) if entry is None else (entry[0] + scores, entry[1] + 1)
        self.pools[key] = (total, count)
        return total / count

    def carried(self, name, width):
        """(sum (B, width), count (B, 1)) of router `name` carried from earlier calls, or zeros."""
        entry = self.state.get(name)
        if entry is None:
            if not self.routing.fresh:
                raise RuntimeError(f"routing variant: no state for {name} on this KV cache")
            z = torch.zeros(self.batch, width, device=self.real.device)
            return z, torch.zeros(self.batch, 1, device=self.real.device)
        if entry[0].shape[0] != self.batch:
            raise RuntimeError("routing variant: the KV cache's state has another batch size (beams are not tracked)")
        return entry

    def running_mean(self, name, scores, weight=None):
        """Causal running mean (B, L, T) of scores over the real tokens up to each position (weighted by weight
        (B, L) when given), continuing earlier calls; a position with no weight yet keeps its own score."""
        w = self.real.to(scores.dtype) if weight is None else weight * self.real.to(scores.dtype)
        w = w.unsqueeze(-1)
        carried_sum, carried_count = self.carried(name, scores.shape[-1])
        sums = (scores * w).cumsum(dim=1) + carried_sum.unsqueeze(1)
        counts = w.cumsum(dim=1) + carried_count.unsqueeze(1)
        self.state[name] = (sums[:, -1], counts[:, -1])
        return torch.where(counts > 0, sums / counts.clamp_min(torch.finfo(scores.dtype).tiny), scores)

    def prompt_mean(self, name, scores):
        """(B, 1, T) mean of scores over the prompt's real tokens, frozen for the sequence."""
        if not self.routing.fresh:
            return self.carried(name, scores.shape[-1])[0].unsqueeze(1)
        prompt = self.routing.prompt.unsqueeze(-1)
        count = prompt.sum(dim=1)
        total = torch.where(prompt, scores, 0).sum(dim=1)
        mean = torch.where(count > 0, total / count.clamp_min(1), scores.mean(dim=1))
        self.state[name] = (mean, count)
        return mean.unsqueeze(1)


def _router_class(modeling):
    """VariantRouter: a subclass of the model file's SmileRouter (so register_routing_hook sees it)."""

    class VariantRouter(modeling.SmileRouter):
        def __init__(self, router, variant, layer, parent, temperature):
            modeling.SmileRouter.__init__(
                self, router.weight.shape[1], router.num_experts, 1, router.top_k, "faithful", temperature
            )
            self.weight = router.weight  # shared, not copied
            self.name, self.variant, self.layer, self.parent = router.name, variant, layer, parent
            self.score, self.pool, self.tokens = VARIANTS[variant]

        @property
        def needs_directions(self):
            return self.score == "spectral"

        def scores(self, x, directions):
            if self.score == "spectral":
                return modeling.spectral_scores(x, directions, self.num_experts)
            return modeling.projection_scores(x, self.weight, self.num_experts)

        def forward(self, x, directions=None):
            leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
            scores = self.scores(flat, directions)
            call = _CALL.get()
            if self.tokens == "token" and self.pool == "module":
                return modeling.top_k_weights(scores / self.temperature, self.top_k).view(*leading, -1)
            if call is None or x.dim() != 3 or tuple(leading) != (call.batch, call.length):
                raise RuntimeError(f"routing variant {self.variant} runs inside a forward call of its model")
            scores = scores.view(*leading, self.num_experts)
            if self.tokens == "sequence":
                scores = call.running_mean(self.name, scores)
            elif self.tokens == "prompt":
                scores = call.prompt_mean(self.name, scores).expand_as(scores)
            if self.tokens == "causal":
                first_only = RESEARCH[self.variant].get("layers", "all") == "first"
                if first_only and call.first_layer not in (None, self.layer):
                    return call.research_weights  # the first layer's decision, for the same tokens
                weights = self.research(call, call.pool("model", scores))
                call.first_layer, call.research_weights = self.layer, weights
                return weights
            if self.pool != "module":
                key = {"model": "model", "layer": ("layer", self.layer)}.get(self.pool)
                if key is None:  # "input": the SmileLinears of one parent that read this very tensor
                    key = ("input", self.parent, x.data_ptr(), tuple(x.shape))
                scores = call.pool(key, scores)
            return modeling.top_k_weights(scores / self.temperature, self.top_k)

        def research(self, call, pooled):
            """The causal research modes, from the model-pooled per-token scores (B, L, T) of this module."""
            options = RESEARCH[self.variant]
            first = _first(call)  # (B, L) bool
            weight = None
            if options.get("weight", "equal") == "margin":
                top2 = pooled.topk(2, dim=-1).values
                weight = top2[..., 0] - top2[..., 1]
            if options.get("skip_first"):
                keep = (~first).to(pooled.dtype)
                weight = keep if weight is None else weight * keep
            if options.get("decay") is not None:  # r^-j for the j-th real token (the mean divides r^-n out)
                index = call.real_index(self.name)
                growth = torch.exp(-index * torch.log(torch.tensor(options["decay"])))
                weight = growth if weight is None else weight * growth
            mean = call.running_mean(self.name, pooled, weight)
            weights = modeling.top_k_weights(mean / self.temperature, self.top_k)
            uniform = torch.full_like(weights, 1.0 / self.num_experts)
            if options.get("commit") is not None:
                top2 = mean.topk(2, dim=-1).values
                committed = (top2[..., 0] - top2[..., 1] >= options["commit"]).unsqueeze(-1)
                weights = torch.where(committed, weights, uniform)
            how = options.get("first", "own")
            if how != "own":
                weights = torch.where(first.unsqueeze(-1), uniform if how == "uniform" else 0 * weights, weights)
            return weights

    return VariantRouter


def _first(call):
    """(B, L) bool: each row's first real token of its sequence (BOS: the same for every task)."""
    real = call.real
    if not call.routing.fresh:
        return torch.zeros_like(real)
    return real & (real.long().cumsum(dim=1) == 1)


def install(model, variant, temperature=None):
    """Route model with `variant` from now on (routers swapped in place; the model's weights are shared)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown routing variant {variant!r}; known: {', '.join(VARIANTS)}")
    modeling = _modeling(model)
    if (getattr(model.config, "smile_routing", None) or "faithful") != "faithful":
        raise ValueError("install a routing variant on a model loaded with faithful routing")
    temperature = float(temperature or getattr(model.config, "smile_routing_temperature", None) or 1.0)
    router_class = _router_class(modeling)
    for name, module in model.named_modules():
        if isinstance(module, modeling.SmileLinear) and module.router is not None:
            layer = re.search(r"\.(\d+)\.", "." + name)
            module.router = router_class(
                module.router, variant, layer.group(1) if layer else "", name.rpartition(".")[0], temperature
            )
    base_forward = model.forward

    @functools.wraps(base_forward)  # generate() reads forward's signature (e.g. for logits_to_keep)
    def forward(*args, **kwargs):
        if _CALL.get() is not None:
            return base_forward(*args, **kwargs)
        call = VariantCall(model, modeling.SmileRouting.from_call(model, args, kwargs))
        token = _CALL.set(call)
        try:
            output = base_forward(*args, **kwargs)
        finally:
            _CALL.reset(token)
        if call.routing.fresh:
            values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
            for cache in (v for v in values if isinstance(v, modeling.Cache)):
                setattr(cache, modeling._CACHE_ATTRIBUTE, call.state)
        return output

    model.forward = forward
    return model


# Expert-likelihood posterior (issue 22, a zero-shot candidate): not a router but a decoding procedure over the
# model's routing hook. Each prompt is scored under each expert forced on every token (the sum of the prompt's
# next-token log-likelihoods, BOS excluded as a target), the most likely expert kept, and the sequence decoded
# with it forced throughout (prompt and answer), as if a prompt router had picked it with certainty.


@torch.inference_mode()
def likelihood_experts(model, ids, mask) -> torch.Tensor:
    """(B,) the expert under which each left-padded prompt (ids, mask) is most likely (teacher forced)."""
    n = model.config.num_local_experts
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    scores = []
    for e in range(n):
        handle = model.register_routing_hook(lambda name, w, e=e: torch.nn.functional.one_hot(
            torch.full(w.shape[:-1], e), n).to(w))  # fmt: skip
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        scores.append((logp * mask[:, 1:] * mask[:, :-1]).sum(dim=1))  # real targets after a real token
    return torch.stack(scores, dim=1).argmax(dim=1)


@contextlib.contextmanager
def forced_rows(model, experts: torch.Tensor):
    """Within the block, row b of every call routes to experts[b] only (weight 1), on every token."""
    n = model.config.num_local_experts

    def hook(name, w):
        one = torch.nn.functional.one_hot(experts, n).to(w)  # (B, T)
        return one.view(one.shape[0], *([1] * (w.dim() - 2)), n).expand_as(w)

    handle = model.register_routing_hook(hook)
    try:
        yield
    finally:
        handle.remove()
