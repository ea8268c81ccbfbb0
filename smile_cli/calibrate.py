"""`smile upscale --calibrate FILE.yaml`: routers fitted in closed form to a few example prompts per expert.

The zero-shot routers read only the task updates; where the tasks' inputs look alike to them (tasks told apart by
one cue word, a shared chat template) they cannot tell the tasks apart. Given 1 to 8 example prompts per expert,
this module runs the base's layers over them and fits, for every upscaled linear, a linear classifier of its own input
(the SmileLinear router's input) onto the expert each prompt belongs to. The output stores it as two float32 tensors
per SmileLinear (`router.calibrated_weight` (T, in), `router.calibrated_bias` (T,): modeling_smile.py's header) and
routes with it per token (`smile_routing: calibrated`), so the mode stays causal and serves where faithful does.

Whose inputs (`activations`): by default every prompt runs once with each expert forced on all its tokens (each
target linear adds that expert's factors, as the output will: _ForcedExperts), always labelled with its own expert.
The routers then see the inputs the SMILE model gives them (fitted to the base's own activations they did not
transfer: the experts' earlier contributions shift them), and since the label does not depend on the expert that made
the features, they cannot learn that expert's fingerprint instead of the task (they did when each prompt ran only
through its own expert). `activations: base` fits to the base's activations (one pass).

Memory: the base is never loaded whole. Its module tree is built with every parameter on the meta device (buffers
such as rotary frequencies are real: they are not in the checkpoint), and one forward pass over all prompts (one
right-padded batch, T copies of it with `activations: experts`) materialises each decoder layer's weights in float32
from the input safetensors just before the layer runs and frees them after it (modules outside the layers, the input
embeddings and the final norm, are materialised once, the same way). Each target linear's input is captured by a
pre-hook and its router fitted there, so memory holds one layer's weights (plus one linear's expert factors), the
batch's activations and one module's features at a time.

The fit, per module, over the prompts' tokens (minus the start every prompt shares, e.g. a chat template's
system turn: identical inputs under different labels carry no information), each token weighted so that every
expert, and every prompt within an expert, weighs the same; features standardised with the weighted mean and
standard deviation of all tokens:
  - ridge regression onto the one-hot expert labels (centred), closed form from the eigendecomposition of the
    smaller Gram matrix: the dual (tokens x tokens) when there are fewer tokens than features, else the primal;
    five penalties, relative to the mean eigenvalue;
  - class centroids (nearest centroid, one mean per expert over its prompts' means).
Each candidate is scored by leave-one-prompt-out accuracy, computed exactly without refitting (ridge: the hat
matrix's diagonal block of the held-out prompt; centroids: the class mean without that prompt), at the prompt level
(majority over the prompt's tokens) then at the token level; the best is kept. The card and the --json summary report
that accuracy per layer and overall, the overall prompt-level one by a majority over every module's token votes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from smile_cli.errors import InputError
from smile_cli.inputs.experts import BaseLayer, Wanted
from smile_cli.naming import layer_index

MAX_PROMPTS = 8  # per expert
RIDGE_PENALTIES = (10.0, 1.0, 0.1, 0.01, 0.001)  # times the mean eigenvalue of the weighted, standardised Gram


@dataclass(frozen=True)
class CalibrationSet:
    """The validated contents of a --calibrate file: token ids of every prompt and the expert it belongs to."""

    path: str
    sha256: str  # of the file's bytes (the manifest records it: --resume refuses another file)
    chat_template: bool
    prompts: tuple[tuple[str, ...], ...]  # per expert, in expert order
    ids: tuple[tuple[int, ...], ...]  # per prompt (expert order, then file order)
    labels: tuple[int, ...]  # per prompt: its expert's index
    shared_start: int  # tokens every prompt starts with (left out of the fit)
    # whose inputs the routers are fitted to: "experts" (each prompt through the SMILE layers with its own expert
    # forced: what the output's routers see when they route it right) or "base" (the base model's own)
    activations: str = "experts"

    def record(self) -> dict:
        """What the manifest records: the file's digest, how prompts were encoded, and the threads the fit ran on
        (its float32 forward pass and float64 solves, like the exact SVD, may round differently on another count)."""
        return {
            "file_sha256": self.sha256,
            "chat_template": self.chat_template,
            **({"activations": self.activations} if self.activations != "experts" else {}),
            "prompts_per_expert": [len(p) for p in self.prompts],
            "threads": torch.get_num_threads(),
        }


@dataclass
class Calibrated:
    """The fitted routers ({module: (weight (T, in), bias (T,)) float32}) and the leave-one-prompt-out report."""

    routers: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def read_calibration(path, plan) -> CalibrationSet:
    """The --calibrate file checked against the plan: every expert named once (its --experts ref or its index from
    0) with 1 to MAX_PROMPTS non-empty prompt strings; InputError (one line) for anything else."""
    path = Path(path)
    where = f"--calibrate {path}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read: {e.strerror or e}") from e
    try:
        loaded = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(loaded, dict) or not loaded:
        raise InputError(f"{where}: expected a mapping of expert (--experts ref or index from 0) -> list of prompts")
    chat_template, activations = False, "experts"
    if "prompts" in loaded and isinstance(loaded["prompts"], dict):  # the long form: prompts + options
        unknown = sorted(set(map(str, loaded)) - {"prompts", "chat_template", "activations"})
        if unknown:
            raise InputError(
                f"{where}: unknown key {unknown[0]!r} (the long form has 'prompts', 'chat_template', 'activations')"
            )
        chat_template = loaded.get("chat_template", False)
        if not isinstance(chat_template, bool):
            raise InputError(f"{where}: chat_template must be true or false, got {chat_template!r}")
        activations = loaded.get("activations", "experts")
        if activations not in ("experts", "base"):
            raise InputError(f"{where}: activations must be experts or base, got {activations!r}")
        loaded = loaded["prompts"]
    refs = [e.ref for e in plan.experts]
    if len(refs) < 2:
        raise InputError(f"{where}: calibration routes between experts; give at least two (--experts)")
    prompts: dict[int, list[str]] = {}
    for key, value in loaded.items():
        index = _expert_index(where, key, refs)
        if index in prompts:
            raise InputError(f"{where}: expert {index} ({refs[index]}) is given twice")
        if not isinstance(value, list) or not value:
            raise InputError(f"{where}: expert {key!r} needs a non-empty list of prompts, got {value!r}")
        if len(value) > MAX_PROMPTS:
            raise InputError(f"{where}: expert {key!r} has {len(value)} prompts; at most {MAX_PROMPTS} per expert")
        for prompt in value:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: expert {key!r}: every prompt must be a non-empty string, got {prompt!r}")
        prompts[index] = list(value)
    missing = [i for i in range(len(refs)) if i not in prompts]
    if missing:
        raise InputError(f"{where}: no prompts for expert {missing[0]} ({refs[missing[0]]}); every expert needs 1-8")
    ordered = [prompts[i] for i in range(len(refs))]
    seen: dict[str, int] = {}
    for i, texts in enumerate(ordered):
        for text in texts:
            if text in seen:
                raise InputError(f"{where}: prompt {text[:60]!r} is given twice (experts {seen[text]} and {i})")
            seen[text] = i
    ids = _encode(where, plan, ordered, chat_template)
    shared = _shared_start(ids)
    for (text, _), row in zip(((t, i) for i, ts in enumerate(ordered) for t in ts), ids, strict=True):
        if len(row) <= shared:
            raise InputError(f"{where}: prompt {text[:60]!r} has no token after the start all prompts share")
    return CalibrationSet(
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        chat_template=chat_template,
        prompts=tuple(tuple(t) for t in ordered),
        ids=tuple(tuple(r) for r in ids),
        labels=tuple(i for i, ts in enumerate(ordered) for _ in ts),
        shared_start=shared,
        activations=activations,
    )


def _expert_index(where: str, key, refs: list[str]) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(refs):
            raise InputError(f"{where}: expert index {key} is out of range: 0 to {len(refs) - 1}")
        return key
    if isinstance(key, str) and key in refs:
        return refs.index(key)
    if isinstance(key, str) and key.strip().isdigit():  # an index written as a string (a JSON file's keys)
        return _expert_index(where, int(key), refs)
    raise InputError(f"{where}: {key!r} is not an expert; use an --experts ref ({', '.join(refs)}) or an index from 0")


def _encode(where: str, plan, prompts: list[list[str]], chat_template: bool) -> list[list[int]]:
    """Token ids of every prompt with the base's tokenizer: as the tokenizer encodes a text (its special tokens,
    e.g. BOS), or as one user turn of the output's chat template with the generation prompt."""
    from smile_cli.vocab import load_tokenizer

    tokenizer = load_tokenizer(plan.base, required=False)
    if tokenizer is None:
        raise InputError(f"{where}: {plan.base.ref} has no readable tokenizer to encode the prompts with")
    template = plan.vocabulary.template if plan.vocabulary is not None else None
    if chat_template and template is None:
        raise InputError(f"{where}: chat_template is true but the output has no chat template (--chat-template)")
    limit = int(plan.base.config.get("max_position_embeddings") or 0) or None
    rows = []
    for text in (t for texts in prompts for t in texts):
        try:
            if chat_template:
                encoded = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], chat_template=template, add_generation_prompt=True,
                    tokenize=True, return_dict=True,
                )["input_ids"]  # fmt: skip
            else:
                encoded = tokenizer(text)["input_ids"]
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer or template objects to, in one line
            raise InputError(f"{where}: cannot encode {text[:60]!r}: {type(e).__name__}: {e}") from e
        row = [int(i) for i in encoded]
        if limit is not None and len(row) > limit:
            raise InputError(f"{where}: prompt {text[:60]!r} has {len(row)} tokens, the base takes {limit}")
        rows.append(row)
    return rows


def _shared_start(ids: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common."""
    shared = min(map(len, ids))
    for row in ids[1:]:
        shared = next((k for k in range(shared) if row[k] != ids[0][k]), shared)
    return shared


# ---------------------------------------------------------------------------------------------------------------
# The streamed forward pass of the base


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost) and keep
    their buffers real (rotary frequencies and the like are computed at construction, not read from checkpoints)."""
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(plan):
    """The base's model class built from its config.json with meta parameters; eval mode, float32."""
    import logging

    import transformers

    model_class = getattr(transformers, plan.architecture.class_name)
    fields = {k: v for k, v in plan.base.config.items() if k not in ("auto_map", "_name_or_path", "torch_dtype")}
    fields["dtype"] = "float32"
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)
    try:
        config = model_class.config_class.from_dict(fields)
        with _parameters_on_meta():
            model = model_class(config)
    finally:
        transformers_logger.setLevel(level)
    return model.eval()


def _units(model):
    """(module, name prefix, recurse) of everything whose parameters are materialised around its own forward call:
    each child of a ModuleList (the decoder layers) with its whole subtree, and every other module with parameters
    of its own (input embeddings, final norm), those parameters only. The output head is not run."""
    from torch import nn

    units = []

    def walk(module, prefix):
        if any(p is not None for p in module._parameters.values()):
            units.append((module, prefix, False))
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList):
                units.extend((layer, f"{prefix}{name}.{i}.", True) for i, layer in enumerate(child))
            else:
                walk(child, f"{prefix}{name}.")

    body = model.base_model
    prefix = next(name for name, module in model.named_modules() if module is body)
    walk(body, f"{prefix}." if prefix else "")
    return units


class _Materialiser:
    """Forward hooks that give a unit its weights (float32, read from the base's safetensors) just before it runs and
    put the meta parameters back after; tracks the most parameter bytes held at once."""

    def __init__(self, plan, read):
        self.plan, self.read = plan, read
        self.held, self.peak_bytes = 0, 0

    def attach(self, module, prefix, recurse):
        owners = []  # (module, parameter name, checkpoint name)
        for name, sub in module.named_modules() if recurse else [("", module)]:
            for pname, param in sub._parameters.items():
                if param is not None:
                    owners.append((sub, pname, f"{prefix}{name + '.' if name else ''}{pname}"))
        saved = {}

        def before(_module, _args, _kwargs=None):
            for sub, pname, full in owners:
                saved[(id(sub), pname)] = sub._parameters[pname]
                tensor = self.read(self.plan.base, full).to(torch.float32)
                sub._parameters[pname] = torch.nn.Parameter(tensor, requires_grad=False)
                self.held += tensor.numel() * 4
            self.peak_bytes = max(self.peak_bytes, self.held)

        def after(_module, _args, _output):
            for sub, pname, _ in owners:
                param = sub._parameters[pname]
                self.held -= param.numel() * 4
                sub._parameters[pname] = saved.pop((id(sub), pname))

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def fit_routers(plan, calibration: CalibrationSet, read) -> Calibrated:
    """Run the base over the calibration prompts, streamed (module docstring), and fit every upscaled linear's
    router; read(checkpoint, name) reads a base tensor (sources.read_finite)."""
    model = _skeleton(plan)
    targets = {lin.module for lin in plan.linears}
    num_experts, prompts = len(plan.experts), len(calibration.ids)
    # "experts": every prompt once per expert, that expert forced on every token of its row (rows p, p + P, ...)
    copies = num_experts if calibration.activations == "experts" else 1
    rows = [row for _ in range(copies) for row in calibration.ids]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding (masked: its id does not matter)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    used = mask.bool().clone()
    used[:, : calibration.shared_start] = False  # the start every prompt shares: no information
    prompt_of = (torch.arange(len(rows)) % prompts).unsqueeze(1).expand(-1, width)[used]
    labels = torch.tensor(calibration.labels)
    forced = torch.arange(len(rows)) // prompts  # the expert forced on each row ("experts")
    fitter = _Fitter(labels, prompt_of, num_experts)
    result = Calibrated()
    handles = []
    materialiser = _Materialiser(plan, read)
    for module, prefix, recurse in _units(model):
        handles += materialiser.attach(module, prefix, recurse)
    routed = _ForcedExperts(plan, read, forced) if calibration.activations == "experts" else None
    for name, module in model.named_modules():
        if name in targets:
            if routed is not None:  # after capture: each row's own expert added to the output, as SMILE would
                handles.append(module.register_forward_hook(functools.partial(routed.add, name)))

            def capture(_module, args, name=name):
                if name in result.routers:
                    raise InputError(f"{plan.base.ref}: '{name}' runs twice in one forward pass; cannot calibrate it")
                features = args[0].detach()[used].double()
                result.routers[name], record = fitter.fit(features)
                result.report.setdefault("modules", {})[name] = record

            handles.append(module.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a base transformers cannot run on these inputs: one line
        raise InputError(
            f"{plan.base.ref}: the calibration forward pass failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(targets - set(result.routers))
    if missing:
        raise InputError(f"{plan.base.ref}: '{missing[0]}' is not run by the base's forward pass; cannot calibrate it")
    result.report = summarise(result.report["modules"], fitter, calibration, plan)
    result.report["weights_peak_bytes"] = materialiser.peak_bytes
    return result


class _ForcedExperts:
    """The SMILE layer's output with each batch row routed to one expert (forced: (rows,) expert index): a forward hook
    on each target linear adds u_i svh_i x + (b_i - b0) of the row's expert i, with the factors the build writes
    (experts.Expert.update at the plan's ranks, factorized as upscale factorizes them), computed when the linear runs
    and dropped after."""

    def __init__(self, plan, read, forced):
        from smile_cli.compute import UpdateFactorizer

        self.plan, self.read, self.labels = plan, read, forced
        o = plan.options
        self.factorizer = UpdateFactorizer(o.svd, o.seed, o.device, check_modules={})
        self.lins = {lin.module: lin for lin in plan.linears}

    def add(self, name, _module, args, output):
        lin, ranks = self.lins[name], self.plan.ranks[name]
        base_weight = self.read(self.plan.base, name + ".weight").float()
        base_bias = self.read(self.plan.base, name + ".bias").float() if lin.has_bias else None
        x = args[0]
        output = output.clone()
        for index, expert in enumerate(self.plan.experts):
            rows = self.labels == index
            if not rows.any():
                continue
            dense = ranks.experts[0] == 0
            base = BaseLayer(lin, self.read, lambda: base_weight, self.factorizer, base_bias)
            update = expert.update(base, Wanted(ranks.factor_rank_of(index), dense=dense))
            if dense:
                delta = x[rows] @ update.dense.T
            else:
                k, f = ranks.experts[index], update.factors
                delta = (x[rows] @ (f.s[:k, None] * f.vh[:k]).T) @ f.u[:, :k].T
            if update.bias is not None:
                delta = delta + update.bias
            output[rows] += delta
        return output


# ---------------------------------------------------------------------------------------------------------------
# The closed-form fit


class _Fitter:
    """Fits one module's router from its token features (N, in) float64 (see the module docstring)."""

    def __init__(self, labels: torch.Tensor, prompt_of: torch.Tensor, num_experts: int):
        self.labels_of_prompt = labels  # (P,)
        self.prompt_of = prompt_of  # (N,) prompt index of each used token
        self.num_experts = num_experts
        self.y = labels[prompt_of]  # (N,)
        counts = torch.bincount(prompt_of, minlength=len(labels)).double()  # tokens per prompt
        per_expert = torch.bincount(labels, minlength=num_experts).double()  # prompts per expert
        self.weight = 1.0 / (num_experts * per_expert[self.y] * counts[prompt_of])  # (N,), sums to 1
        self.blocks = [torch.nonzero(prompt_of == p).flatten() for p in range(len(labels))]

    def fit(self, x: torch.Tensor):
        w, T = self.weight, self.num_experts
        mean = w @ x
        std = (w @ (x - mean) ** 2).sqrt()
        std = torch.where(std > 1e-8 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
        z = (x - mean) / std
        onehot = torch.nn.functional.one_hot(self.y, T).double()
        candidates = [("centroid", None, *self._centroid(z))]
        candidates += [("ridge", rel, *fit) for rel, fit in zip(RIDGE_PENALTIES, self._ridge(z, onehot), strict=True)]
        best = max(enumerate(candidates), key=lambda c: (c[1][4], c[1][5], -c[0]))[1]
        method, penalty, coef, bias, prompt_acc, token_acc, votes = best
        weight = (coef / std[:, None]).T.contiguous()  # (T, in) on the raw input
        bias = bias - weight @ mean
        record = {
            "method": method if penalty is None else f"ridge, penalty {penalty:g}",
            "prompt_accuracy": prompt_acc,
            "token_accuracy": token_acc,
            "votes": votes,
            "candidates": {
                (m if p is None else f"ridge {p:g}"): [round(pa, 4), round(ta, 4)]
                for m, p, _, _, pa, ta, _ in candidates
            },
        }
        return (weight.float(), bias.float()), record

    def _scores(self, predictions: list[torch.Tensor]):
        """(prompt-level accuracy, token-level accuracy, votes (P, T)) of held-out scores per prompt (n_p, T)."""
        T = self.num_experts
        votes = torch.stack([torch.bincount(s.argmax(dim=1), minlength=T) for s in predictions]).double()
        tokens = torch.cat([s.argmax(dim=1) for s in predictions])
        truth = torch.cat([self.y[b] for b in self.blocks])
        prompt_acc = float((_majority(votes) == self.labels_of_prompt).double().mean())
        token_acc = float((tokens == truth).double().mean())
        return prompt_acc, token_acc, votes

    def _centroid(self, z):
        """Nearest class centroid (each class the mean of its prompts' means): (coef (in, T), bias (T,), scores)."""
        T = self.num_experts
        prompt_means = torch.stack([z[b].mean(dim=0) for b in self.blocks])  # (P, in)
        labels = self.labels_of_prompt
        sums = torch.zeros(T, z.shape[1], dtype=z.dtype).index_add_(0, labels, prompt_means)
        counts = torch.bincount(labels, minlength=T).double()
        centroids = sums / counts[:, None]
        held_out = []
        for p, block in enumerate(self.blocks):
            c, n = labels[p], counts.clone()
            loo = sums.clone()
            loo[c] -= prompt_means[p]
            n[c] -= 1
            means = loo / n.clamp_min(1)[:, None]
            scores = z[block] @ means.T - 0.5 * (means * means).sum(dim=1)
            held_out.append(torch.where(n > 0, scores, torch.full_like(scores, -math.inf)))
        return (centroids.T, -0.5 * (centroids * centroids).sum(dim=1), *self._scores(held_out))

    def _ridge(self, z, onehot):
        """Weighted ridge onto the centred one-hot labels, for each penalty: (coef (in, T), bias (T,), scores)."""
        T = self.num_experts
        root = self.weight.sqrt()[:, None]
        a, b = root * z, root * (onehot - 1.0 / T)  # weighted rows
        n, d = a.shape
        if n <= d:  # dual: the tokens' Gram matrix
            evals, u = torch.linalg.eigh(a @ a.T)
        else:  # primal: the features' Gram matrix
            evals, v = torch.linalg.eigh(a.T @ a)
        keep = evals > evals.max() * 1e-12
        evals = evals[keep]
        if n <= d:
            u = u[:, keep]
        else:
            v = v[:, keep]
            u = (a @ v) / evals.sqrt()
        scale = evals.mean()
        ub = u.T @ b  # (r, T)
        out = []
        for relative in RIDGE_PENALTIES:
            penalty = relative * scale
            shrink = evals / (evals + penalty)  # the hat matrix's eigenvalues
            fitted = u @ (shrink[:, None] * ub)
            held_out = []
            for block in self.blocks:
                ub_block = u[block]
                hat = (ub_block * shrink) @ ub_block.T
                residual = torch.linalg.solve(torch.eye(len(block), dtype=hat.dtype) - hat, b[block] - fitted[block])
                held_out.append((b[block] - residual) / root[block])
            if n <= d:
                coef = a.T @ (u @ (ub / (evals + penalty)[:, None]))
            else:
                coef = v @ ((v.T @ (a.T @ b)) / (evals + penalty)[:, None])
            out.append((coef, torch.full((T,), 1.0 / T, dtype=z.dtype), *self._scores(held_out)))
        return out


def _majority(votes: torch.Tensor) -> torch.Tensor:
    """(P,) the most voted expert of each row of votes (P, T); ties to the lowest index."""
    return votes.argmax(dim=1)


def summarise(modules: dict, fitter: _Fitter, calibration: CalibrationSet, plan) -> dict:
    """The report of a fit: per module (method, leave-one-prompt-out accuracies), per layer (means over its modules,
    and the prompt-level accuracy of a majority over its modules' token votes), overall (the same over every module);
    the votes themselves are left out."""
    truth = fitter.labels_of_prompt
    layers: dict[str, list[str]] = {}
    for name in (lin.module for lin in plan.linears):
        index = layer_index(name)
        layers.setdefault("other" if index is None else str(index), []).append(name)

    def group(names):
        votes = sum(modules[n]["votes"] for n in names)
        return {
            "modules": len(names),
            "token_accuracy": round(sum(modules[n]["token_accuracy"] for n in names) / len(names), 4),
            "module_prompt_accuracy": round(sum(modules[n]["prompt_accuracy"] for n in names) / len(names), 4),
            "prompt_accuracy": round(float((_majority(votes) == truth).double().mean()), 4),
        }

    methods: dict[str, int] = {}
    for record in modules.values():
        methods[record["method"]] = methods.get(record["method"], 0) + 1
    overall = group(list(modules))
    all_votes = sum(r["votes"] for r in modules.values())
    picked = _majority(all_votes)
    per_expert = {e.ref: round(float((picked[truth == i] == i).double().mean()), 4) for i, e in enumerate(plan.experts)}
    return {
        "prompts": len(truth),
        "prompts_per_expert": [len(p) for p in calibration.prompts],
        "tokens": int(fitter.prompt_of.numel()),
        "shared_start_tokens": calibration.shared_start,
        "chat_template": calibration.chat_template,
        "overall": {**overall, "prompt_accuracy_by_expert": per_expert},
        "layers": {name: group(names) for name, names in layers.items()},
        "methods": dict(sorted(methods.items())),
        "modules": {n: {k: r[k] for k in ("method", "prompt_accuracy", "token_accuracy")} for n, r in modules.items()},
    }


def card_lines(report: dict) -> str:
    """The model card's account of the calibration."""
    o = report["overall"]
    lines = [
        f"- Calibrated routers (`smile upscale --calibrate`): fitted to {report['prompts']} example prompts "
        f"({', '.join(map(str, report['prompts_per_expert']))} per expert; {report['tokens']} tokens"
        + (", through the chat template" if report["chat_template"] else "")
        + f"; the {report['shared_start_tokens']} token(s) every prompt starts with left out) on the base's inputs "
        "of every upscaled linear; per module the better of ridge regression and class centroids by "
        "leave-one-prompt-out accuracy (methods chosen: "
        + ", ".join(f"{m} x{n}" for m, n in report["methods"].items())
        + ")",
        f"  - Leave-one-prompt-out accuracy, overall: prompts {100 * o['prompt_accuracy']:.1f}% (majority over every "
        f"module's token votes), tokens {100 * o['token_accuracy']:.1f}% (mean over modules), prompts per module "
        f"{100 * o['module_prompt_accuracy']:.1f}% (mean); by expert: "
        + ", ".join(f"`{ref}` {100 * v:.1f}%" for ref, v in o["prompt_accuracy_by_expert"].items()),
        "  - Per layer (prompts by majority over the layer's modules / tokens, mean over its modules): "
        + "; ".join(
            f"{name} {100 * g['prompt_accuracy']:.0f}% / {100 * g['token_accuracy']:.0f}%"
            for name, g in report["layers"].items()
        ),
    ]
    return "\n".join(lines) + "\n"
