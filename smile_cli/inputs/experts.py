"""Experts behind one interface, and the one dispatcher that opens any input (`open_input`).

An expert is a fine-tuned checkpoint (DenseExpert: its update of a linear is its weight minus the base's) or a
PEFT LoRA adapter (LoraExpert: scale * B @ A, factorized exactly from the factors, lora.py). Each says
- what it reads for one linear (`reads`, in the order `update` reads it: the prefetcher reads ahead by it),
- its task update of a linear (`update`: the top singular triplets, and on request the dense update, the bias
  change and the update's energy),
- its tensor names matched to the base's (`aligned_to`: a checkpoint saved from another model class, renamed in
  a copy; the architecture checked first) and its checks against the base (`check_against`: shapes, dtypes; its
  warnings returned),
and carries what identifies it (`ref`, `path`, `revision`, `fingerprint()`, `warnings`), the input it was opened
from (`opened`: its files, for the Hub checks, hub_session.py) and, for a fine-tuned checkpoint, the `checkpoint`
itself (its tokenizer and other tensors: vocab.py, kept.py; None for an adapter).

`open_input` tells what a ref is (a Hub id read from its remote headers, a LoRA adapter folder, a model folder) and
opens it; the base is opened by it too, where an adapter is refused. What the experts' updates become: layer.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from smile_cli.compute import UpdateFactorizer, factorize_update
from smile_cli.errors import InputError
from smile_cli.factorize import Factors, single_threaded, zero_factors
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.hub_checkpoint import open_hub_checkpoint
from smile_cli.inputs.local import open_checkpoint
from smile_cli.inputs.lora import LoraAdapter, is_adapter_folder, lora_factors, open_adapter
from smile_cli.inputs.resolve import is_hub_ref, offline, resolve
from smile_cli.naming import natural_key
from smile_cli.plan import LinearPlan

# Config fields that must agree between the base and every fine-tuned expert.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass
class TaskUpdate:
    """One expert's update of one linear (float32): its top singular triplets (zeros for a zero update) and, when
    asked for, the whole update (dense experts), the bias change and the energy ||dW||_F^2 (rank allocation)."""

    factors: Factors
    zero: bool
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    energy: float | None = None
    complete: bool = False  # whether the factors hold the whole spectrum
    # the numerical rank of the update within its factors (numerical_rank), when asked for: a merged LoRA's
    # spectrum beyond its r is the merge's rounding noise, and its rows are not stored (kept_rank)
    held: int | None = None


@dataclass(frozen=True)
class Wanted:
    """What a caller needs of one expert's update of one linear: its top `rank` singular triplets (with energy, at
    least the whole spectrum when that is cheap) and, on request, the whole update (dense experts), its energy
    ||dW||_F^2 (rank allocation), its numerical rank where the headers do not tell it (held: TaskUpdate.held, a
    fine-tuned checkpoint's; Expert.update_rank gives an adapter's), and whether its factorization is the one the
    factorizer's quality check measures (checked: UpdateFactorizer.check; an adapter's factors are exact and never
    measured)."""

    rank: int
    dense: bool = False
    energy: bool = False
    held: bool = False
    checked: bool = False


@dataclass
class BaseLayer:
    """The base's side of one linear, shared by every expert's update of it: the linear, how inputs are read
    (read(source, name), in the order of Expert.reads), the base weight in float32 on the compute device (weight(),
    called only when needed), the base bias in float32 (given: the experts' bias changes are wanted too) and the
    factorizer of dense updates."""

    lin: LinearPlan
    read: Callable
    weight: Callable[[], torch.Tensor]
    factorizer: UpdateFactorizer
    bias: torch.Tensor | None = None

    @classmethod
    def reading(cls, base: Checkpoint, lin: LinearPlan, read: Callable, factorizer: UpdateFactorizer) -> BaseLayer:
        """lin of the base checkpoint, its weight read (once) when first needed; no bias change wanted."""
        weight = functools.cache(lambda: factorizer.to_device(read(base, lin.module + ".weight")).float())
        return cls(lin, read, weight, factorizer)


# The numerical rank's tolerance relative to the largest singular value: a float32 factorization's own error is
# about 1e-7 of it; a direction 1e-5 below the top one holds under 1e-10 of the update's energy.
NUMERICAL_RANK_RTOL = 1e-5


def numerical_rank(s: torch.Tensor, weight_norm: float, dtype: torch.dtype, shape: tuple[int, int]) -> int:
    """How many singular values s (descending) of an update dW = W_expert - W_base are above the noise of how the
    expert was stored: NUMERICAL_RANK_RTOL of the largest, and the spectral norm that rounding every weight of
    W_expert to its dtype reaches (at most eps/2 relative per weight, about eps/2 * ||W||_F * (1/sqrt(out) +
    1/sqrt(in)) for independent errors: bounded here by eps * ||W||_F / sqrt(min(out, in)), twice that for a
    square matrix). A merged rank-r LoRA has r values far above both; a full fine-tune's spectrum stays above."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    rounding = torch.finfo(dtype).eps * weight_norm / min(shape) ** 0.5
    tolerance = max(NUMERICAL_RANK_RTOL * float(s[0]), rounding)
    return int((s > tolerance).sum())


def kept_rank(planned: int, update: TaskUpdate) -> int:
    """The rank expert's factors are stored at: the planned one, or the update's numerical rank when it is below
    (at least 1 row, the format's least, for an update that is zero)."""
    return planned if update.held is None else max(1, min(planned, update.held))


class Expert:
    """The interface upscale, ranks and inspect use; see the module docstring."""

    ref: str
    path: Path
    revision: str | None  # the Hub snapshot's commit, None for a local folder
    warnings: list[str]
    checkpoint: Checkpoint | None  # a full model of the base's architecture (tokenizer, other tensors), or None

    @property
    def opened(self) -> Checkpoint | LoraAdapter:
        """The input this expert reads, as open_input opened it."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def reads(self, lin: LinearPlan) -> list[tuple[object, str]]:
        """(source, tensor name) of every tensor update() reads for lin with the bias change, in that order."""
        raise NotImplementedError

    def aligned_to(self, base: Checkpoint, probe: str) -> tuple[Expert, list[str]]:
        """(this expert with its tensor names matched to the base's, the warnings that says so): itself, unless
        a fine-tuned checkpoint shares no name with the base (_match_prefix); probe: the first upscaled weight."""
        return self, []

    def check_against(self, base: Checkpoint, linears: list[LinearPlan]) -> list[str]:
        """Raise InputError when this expert cannot be an expert of base at linears; return any warnings."""
        raise NotImplementedError

    def update_rank(self, lin: LinearPlan) -> int | None:
        """The rank of this expert's update of lin when known from its headers alone, else None (for
        planning.decide_ranks)."""
        return None

    def update(self, base: BaseLayer, wanted: Wanted) -> TaskUpdate:
        """This expert's update of base.lin, as `wanted` says (see Wanted); with the bias change when base.bias is
        given."""
        raise NotImplementedError


@dataclass
class DenseExpert(Expert):
    """A fine-tuned checkpoint of the base's architecture."""

    checkpoint: Checkpoint

    @property
    def ref(self) -> str:
        return self.checkpoint.ref

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def revision(self) -> str | None:
        return self.checkpoint.revision

    @property
    def warnings(self) -> list[str]:
        return self.checkpoint.warnings

    @property
    def opened(self) -> Checkpoint:
        return self.checkpoint

    def fingerprint(self) -> dict:
        return self.checkpoint.fingerprint()

    def reads(self, lin: LinearPlan) -> list[tuple[object, str]]:
        names = [lin.module + ".weight"] + ([lin.module + ".bias"] if lin.has_bias else [])
        return [(self.checkpoint, name) for name in names]

    def aligned_to(self, base: Checkpoint, probe: str) -> tuple[Expert, list[str]]:
        """The architecture first (ARCHITECTURE_FIELDS of the configs): names are matched between checkpoints of
        one architecture only."""
        config = self.checkpoint.config
        for key in ARCHITECTURE_FIELDS:
            if config.get(key) != base.config.get(key):
                mine, theirs = config.get(key), base.config.get(key)
                raise InputError(f"{self.ref}: architecture mismatch: {key} is {mine!r}, the base's is {theirs!r}")
        prefixes = _match_prefix(base, self.checkpoint, probe)
        if prefixes is None:
            return self, []
        old, new = prefixes
        warning = (
            f"{self.ref}: tensor names carry the prefix '{old}' where the base's carry '{new}' (saved from "
            "another model class); matched by that prefix"
        )
        return DenseExpert(self.checkpoint.renamed(old, new)), [warning]

    def check_against(self, base: Checkpoint, linears: list[LinearPlan]) -> list[str]:
        """Every upscaled weight present, of the base's shape, floating-point, with a bias where the base has one
        (the architecture and the names: aligned_to, first)."""
        ref = self.ref
        tensors = self.checkpoint.tensors
        for lin in linears:
            weight = lin.module + ".weight"
            info = tensors.get(weight)
            if info is None:
                raise InputError(f"{ref}: tensor '{weight}' is missing")
            if info.shape != (lin.out_features, lin.in_features):
                raise InputError(
                    f"{ref}: tensor '{weight}' has shape {list(info.shape)}, "
                    f"the base's is {[lin.out_features, lin.in_features]}"
                )
            if not info.dtype.is_floating_point:
                raise InputError(f"{ref}: tensor '{weight}' is {info.dtype}, not a floating-point weight")
            has_bias = lin.module + ".bias" in tensors
            if has_bias != lin.has_bias:
                raise InputError(f"{ref}: '{lin.module}' {'has' if has_bias else 'lacks'} a bias, unlike the base")
            if has_bias and tensors[lin.module + ".bias"].shape != (lin.out_features,):
                raise InputError(f"{ref}: tensor '{lin.module}.bias' has the wrong shape")
        return []

    def update(self, base: BaseLayer, wanted: Wanted) -> TaskUpdate:
        m, factorizer = base.lin.module, base.factorizer
        stored = base.read(self.checkpoint, m + ".weight")
        delta, dtype = factorizer.to_device(stored).float(), stored.dtype
        del stored
        with single_threaded():  # a sum's rounding follows the thread count: ranks must not
            weight_norm = float(torch.linalg.vector_norm(delta)) if wanted.held else None
        delta -= base.weight()
        with single_threaded():
            total = float(delta.double().square().sum()) if wanted.energy else None
        rank = wanted.rank
        factors, zero = factorize_update(delta, rank, factorizer)
        if wanted.checked and rank > 0:  # zero factors measure as the factorization of a zero update would: 1.0
            factorizer.check(m, delta, factors)
        dense, complete = delta if wanted.dense else None, rank == min(delta.shape)
        update = TaskUpdate(factors, zero, dense, energy=total, complete=complete)
        if wanted.held:
            update.held = 0 if zero else numerical_rank(factors.s, weight_norm, dtype, tuple(delta.shape))
        del delta
        if base.bias is not None:
            update.bias = base.read(self.checkpoint, m + ".bias").float() - base.bias
        return update


@dataclass
class LoraExpert(Expert):
    """A PEFT LoRA adapter of the base: its update is exact from lora_A / lora_B (lora.py), and zero in the modules
    it does not touch; its bias change is scale * lora_B.bias with lora_bias=True, else zero."""

    adapter: LoraAdapter
    checkpoint = None  # not a model: no tensors of its own beyond the factors

    @property
    def ref(self) -> str:
        return self.adapter.ref

    @property
    def path(self) -> Path:
        return self.adapter.path

    @property
    def revision(self) -> str | None:
        return self.adapter.revision

    @property
    def warnings(self) -> list[str]:
        return self.adapter.warnings

    @property
    def opened(self) -> LoraAdapter:
        return self.adapter

    def fingerprint(self) -> dict:
        return self.adapter.fingerprint()

    def reads(self, lin: LinearPlan) -> list[tuple[object, str]]:
        lora = self.adapter.modules.get(lin.module)
        if lora is None:
            return []
        return [(self.adapter, name) for name in (lora.b, lora.a, *([lora.bias] if lora.bias else []))]

    def check_against(self, base: Checkpoint, linears: list[LinearPlan]) -> list[str]:
        """Every module the adapter touches is an upscaled linear of the base, with matching factor shapes."""
        adapter, ref, warnings = self.adapter, self.ref, []
        by_module = {lin.module: lin for lin in linears}
        name = adapter.base_model_name
        if name and not _names_base(name, base):
            warnings.append(f"{ref}: adapter was trained on '{name}', not on --base {base.ref} (not checked)")
        for module, lora in adapter.modules.items():
            lin = by_module.get(module)
            if lin is None:
                raise InputError(f"{ref}: LoRA module '{module}' is not an upscaled linear of the base")
            a, b = adapter.tensors[lora.a].shape, adapter.tensors[lora.b].shape
            if a != (lora.rank, lin.in_features) or b != (lin.out_features, lora.rank):
                raise InputError(
                    f"{ref}: LoRA factors of '{module}' have shapes A {list(a)}, B {list(b)}; the base "
                    f"layer needs A [{lora.rank}, {lin.in_features}] and B [{lin.out_features}, {lora.rank}]"
                )
            if lora.bias and not lin.has_bias:
                raise InputError(f"{ref}: '{module}' has a LoRA bias (lora_bias) but the base layer has none")
            if lora.bias and adapter.tensors[lora.bias].shape != (lin.out_features,):
                raise InputError(f"{ref}: tensor '{lora.bias}' has the wrong shape")
            for key in (lora.a, lora.b):
                if not adapter.tensors[key].dtype.is_floating_point:
                    raise InputError(f"{ref}: tensor '{key}' is not floating-point")
        if not adapter.modules:
            warnings.append(f"{ref}: adapter has no LoRA factors: its update is zero everywhere")
        return warnings

    def update_rank(self, lin: LinearPlan) -> int:
        """At most the adapter's r for the module (rank_pattern applied); 0 where it does not touch it."""
        lora = self.adapter.modules.get(lin.module)
        return 0 if lora is None else lora.rank

    def update(self, base: BaseLayer, wanted: Wanted) -> TaskUpdate:
        """Exact factors (no factorizer, no base weight); with energy wanted the whole spectrum (rank <= r)."""
        lin, rank, dense, energy = base.lin, wanted.rank, wanted.dense, wanted.energy
        shape = (lin.out_features, lin.in_features)
        lora = self.adapter.modules.get(lin.module)
        if lora is None:
            update = TaskUpdate(zero_factors(shape, rank), True, torch.zeros(shape) if dense else None, complete=True)
            update.energy = 0.0 if energy else None
            update.bias = torch.zeros(lin.out_features) if base.bias is not None else None
            return update
        b, a = base.read(self.adapter, lora.b), base.read(self.adapter, lora.a)
        factors = lora_factors(b, a, lora.scale, max(rank, lora.rank) if energy else rank)
        delta = (b.double() @ a.double()).mul_(lora.scale).float() if dense else None
        total = float(factors.s.double().square().sum()) if energy else None
        update = TaskUpdate(factors, False, delta, energy=total, complete=True)
        if base.bias is not None:
            bias = base.read(self.adapter, lora.bias).double().mul(lora.scale) if lora.bias else None
            update.bias = bias.float() if bias is not None else torch.zeros(lin.out_features)
        return update


def _match_prefix(base: Checkpoint, expert: Checkpoint, probe: str) -> tuple[str, str] | None:
    """An expert that shares no tensor name with the base was saved from another model class (`layers.0...`
    from the bare model against `model.layers.0...`): its names are matched by the leading components it lacks
    or has in addition to the base's first upscaled weight `probe` ((its prefix, the base's)), or it is refused
    naming its prefix. None: the names match already."""
    if probe in expert.tensors or not expert.tensors or set(expert.tensors) & set(base.tensors):
        return None
    parts = probe.split(".")
    for cut in range(len(parts) - 2):  # leading components the expert lacks (a suffix of 3 components at least)
        suffix = ".".join(parts[cut:])
        found = [n for n in expert.tensors if n == suffix or (cut == 0 and n.endswith("." + suffix))]
        if len(found) == 1:
            return found[0][: len(found[0]) - len(suffix)], ".".join(parts[:cut] + [""]) if cut else ""
    example = min(expert.tensors, key=natural_key)
    prefix = example.split(".")[0] + "."
    raise InputError(
        f"{expert.ref}: its tensor names start with '{prefix}' (e.g. '{example}') and none matches the base's "
        f"(e.g. '{probe}'): not a checkpoint of the base's architecture"
    )


def _names_base(name: str, base: Checkpoint) -> bool:
    """Whether an adapter's base_model_name_or_path plausibly names the base checkpoint."""
    if name in (base.ref, base.config.get("_name_or_path")):
        return True
    path = Path(name).expanduser()
    return path.exists() and path.resolve() == base.path.resolve()


def open_input(
    ref: str,
    *,
    inputs: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    adapter: bool = False,
) -> Checkpoint | LoraAdapter:
    """Any input, told by what ref names: a Hub id, when online, planned from its remote headers and read as
    `inputs` says (hub_checkpoint.py; adapters and pickle weights are downloaded); with `adapter`, a LoRA adapter
    folder (adapter_config.json, no config.json: lora.py); else a model folder, or a Hub id's snapshot (local.py)."""
    if is_hub_ref(ref) and not offline():
        checkpoint = open_hub_checkpoint(ref, inputs, trust_remote_code=trust_remote_code)
        if checkpoint is not None:  # None: an adapter or pickle weights, downloaded and read locally
            return checkpoint
    folder, revision = resolve(ref)
    if adapter and is_adapter_folder(folder):
        return open_adapter(ref, folder, revision)
    return open_checkpoint(
        ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, resolved=(folder, revision)
    )


def open_expert(ref: str, **policy) -> Expert:
    """An expert (open_input's policy: inputs, allow_pickle, trust_remote_code): a LoRA adapter or a fine-tune."""
    opened = open_input(ref, adapter=True, **policy)
    return LoraExpert(opened) if isinstance(opened, LoraAdapter) else DenseExpert(opened)
