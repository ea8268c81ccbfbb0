"""Non-upscaled tensors an expert changed (fine-tuned embeddings, norms, output head): SMILE keeps the base's, so
each difference is measured, as ||expert - base|| / ||base|| (Frobenius), and reported in the dry run and the
model card.

Streamed: one base tensor and one expert tensor at a time, the difference formed in float32 chunks of bounded
size, so memory stays fixed whatever the model.
"""

from __future__ import annotations

import math

import torch

from smile_cli.factorize import single_threaded
from smile_cli.inputs.checks import read_finite
from smile_cli.naming import with_layer_wildcard

CHUNK_ELEMENTS = 2**22  # float32 working memory of one comparison chunk: 16 MiB


def compare_kept(plan) -> tuple[list[dict], list[str]]:
    """[{expert, ref, tensor, relative_difference}] of every copied base tensor that an expert (a full
    checkpoint) holds with other values, and the plan's warnings about them (one per such expert, and the experts
    not compared). Linear layers that --target leaves out are the user's choice, not listed."""
    experts = [(i, e.checkpoint) for i, e in enumerate(plan.experts) if e.checkpoint is not None]  # not adapters
    from smile_cli.inputs.hub_session import not_measured_streamed

    # streamed Hub inputs: the plan reads headers only (hub_session.py)
    experts, warnings = not_measured_streamed(plan, experts)
    arch = plan.architecture
    left_out = set(arch.linears) - {arch.output_head} if plan.options.target is not None else set()
    found = []
    for step in plan.steps:
        name = step.copy
        info = plan.base.tensors.get(name) if name else None
        if info is None or not info.dtype.is_floating_point or name.rpartition(".")[0] in left_out:
            continue
        holders = [(i, e) for i, e in experts if _comparable(e.tensors.get(name), info)]
        if not holders:
            continue
        base = read_finite(plan.base, name)
        for index, expert in holders:
            relative = relative_difference(read_finite(expert, name), base)
            if relative > 0:
                found.append({"expert": index, "ref": expert.ref, "tensor": name, "relative_difference": relative})
        del base
    for index, expert in experts:
        mine = [d for d in found if d["expert"] == index]
        if mine:
            largest = max(mine, key=lambda d: d["relative_difference"])
            size = format_relative(largest["relative_difference"])
            warnings.append(
                f"{expert.ref}: {len(mine)} non-upscaled tensor(s) differ from the base's (largest "
                f"'{largest['tensor']}', {size}); SMILE keeps the base's"
            )
    return found, warnings


def _comparable(info, base_info) -> bool:
    """The expert's tensor has the base's shape, or more rows (an embedding grown with added tokens)."""
    if info is None or not info.dtype.is_floating_point or len(info.shape) != len(base_info.shape):
        return False
    return info.shape[1:] == base_info.shape[1:] and info.shape[:1] >= base_info.shape[:1]


def relative_difference(tensor: torch.Tensor, base: torch.Tensor) -> float:
    """||tensor - base|| / ||base|| over the base's rows (inf when the base is zero and they differ); float32
    norms of chunks, summed in float64 (3 significant digits are reported)."""
    tensor = tensor[: base.shape[0]] if base.dim() else tensor
    if torch.equal(tensor, base):  # most kept tensors: nothing converted
        return 0.0
    flat, base_flat = tensor.reshape(-1), base.reshape(-1)
    difference = norm = 0.0
    with single_threaded():  # a norm is a sum: its rounding (and the model card) would follow the thread count
        for start in range(0, base_flat.numel(), CHUNK_ELEMENTS):
            b = base_flat[start : start + CHUNK_ELEMENTS].float()
            difference += torch.linalg.vector_norm(flat[start : start + CHUNK_ELEMENTS].float() - b).item() ** 2
            norm += torch.linalg.vector_norm(b).item() ** 2
    if difference == 0:
        return 0.0
    return math.sqrt(difference / norm) if norm else math.inf


def grouped(found: list[dict]) -> list[str]:
    """The differences for people, one line per expert and kind of tensor (layer indices as *): 'REF:
    model.layers.*.input_layernorm.weight (2 tensors, up to 3.1% of the base's norm)'."""
    groups: dict[tuple[str, str], list[float]] = {}
    for d in found:
        groups.setdefault((d["ref"], with_layer_wildcard(d["tensor"])), []).append(d["relative_difference"])
    lines = []
    for (ref, kind), values in groups.items():
        count = f"{len(values)} tensors, up to " if len(values) > 1 else ""
        lines.append(f"{ref}: {kind} ({count}{format_relative(max(values))})")
    return lines


def format_relative(value: float) -> str:
    """A relative difference for people: '3.12% of the base's norm'."""
    return f"{100 * value:.3g}% of the base's norm" if value != math.inf else "the base's is zero"
