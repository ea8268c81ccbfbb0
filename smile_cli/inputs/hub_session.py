"""A run's Hub inputs as a whole: one session object checks them from the first byte the run reads to the last.

Before anything is written, download mode's files are fetched (streamed inputs cannot be split into parts: each
part would fetch and verify every file whole); a single run takes up what an earlier attempt left (--resume) and
saves the sha256 of every tensor used in staging at each output shard; at the end every file is read to its end and
matched with its published sha256 (hub_integrity.py). Also what the plan and the dry run say about Hub inputs.
"""

from __future__ import annotations

from pathlib import Path

from smile_cli.errors import InputError
from smile_cli.files import JSON_ERRORS, load_json
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.hub_checkpoint import HubCheckpoint
from smile_cli.inputs.hub_stream import LocalSource
from smile_cli.writer import write_json

VERIFY_STATE = ".smile-hub-digests.json"


def checkpoints(plan) -> list:
    """The base and the experts' opened inputs (a LoRA expert's is its adapter: lora.py)."""
    return [plan.base, *(expert.opened for expert in plan.experts)]


def hub_inputs(plan) -> list[HubCheckpoint]:
    return [c for c in checkpoints(plan) if isinstance(c, HubCheckpoint)]


class HubSession:
    """The FileChecks of one run (see the module docstring); `parts`: this run writes one part of several, which
    share the staging folder: it neither takes up nor saves digests there."""

    def __init__(self, plan, staging: Path, *, resume: bool, parts: bool):
        inputs = hub_inputs(plan)
        if parts and any(c.streamed_bytes() for c in inputs):
            raise InputError(
                "streamed Hub inputs cannot be split with --shard or torchrun (each part would fetch and verify "
                "every file whole); use --inputs download"
            )
        for checkpoint in inputs:
            checkpoint.fetch()
        self.own = not parts
        self.checks = {f"{c.ref}/{n}": f for c in inputs for n, f in c.checks.items()}
        self.path = staging / VERIFY_STATE
        if resume and self.own and self.checks:
            try:
                state = load_json(self.path)
            except JSON_ERRORS:
                state = {}
            for key, check in self.checks.items():
                if isinstance(state.get(key), dict):
                    check.restore(state[key])

    def save(self) -> None:
        """The sha256 of every tensor used so far, into staging (a single run's, once staging exists)."""
        if not self.own or not self.checks or not self.path.parent.is_dir():
            return
        write_json(self.path, {key: check.state() for key, check in self.checks.items()})

    def finish(self) -> None:
        """Read every Hub file to its end and match it with its published sha256 (IntegrityError otherwise)."""
        for check in self.checks.values():
            check.finish()
        if self.own:
            self.path.unlink(missing_ok=True)


def is_streamed(checkpoint: Checkpoint) -> bool:
    return isinstance(checkpoint, HubCheckpoint) and checkpoint.streamed_bytes() > 0


def not_measured_streamed(plan, experts: list) -> tuple[list, list[str]]:
    """The (index, expert) pairs whose kept tensors can be compared with the base's (kept.py) without fetching
    tensor data while planning: none when the base is streamed, else the experts that are not; and the warning
    that says which were left out (a local copy, or the files in the cache, has them measured), if any."""
    left = [e for _, e in experts if is_streamed(e)] if not is_streamed(plan.base) else [e for _, e in experts]
    warnings = []
    if left:
        warnings.append(
            f"non-upscaled tensors of {', '.join(e.ref for e in left)} not compared with the base's: not in the "
            "local cache, and the plan reads only headers from the Hub"
        )
    return [(i, e) for i, e in experts if e not in left], warnings


def inputs_summary(plan) -> dict:
    """Per input: where it is read from and how many bytes; and the disk each --inputs mode needs."""
    rows, uncached = [], 0
    for checkpoint in checkpoints(plan):
        if isinstance(checkpoint, HubCheckpoint):
            total = sum(c.size for c in checkpoint.checks.values())
            cached = sum(c.size for c in checkpoint.checks.values() if isinstance(c.source, LocalSource))
            uncached += total - cached
            rows.append(
                {
                    "ref": checkpoint.ref,
                    "commit": checkpoint.revision,
                    "mode": checkpoint.mode,
                    "weight_bytes": total,
                    "cached_bytes": cached,
                    "files": len(checkpoint.checks),
                }
            )
        else:
            rows.append({"ref": checkpoint.ref, "mode": "local", "weight_bytes": sum(checkpoint_sizes(checkpoint))})
    out = plan.out_bytes
    disk = {"stream": out, "auto": out, "download": out + uncached}
    return {"inputs": rows, "disk_bytes_by_mode": disk}


def checkpoint_sizes(checkpoint: Checkpoint) -> list[int]:
    return [path.stat().st_size for path in checkpoint.files if path.is_file()]
