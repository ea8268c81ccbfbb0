"""Serve every expert of a SMILE folder as a LoRA adapter of its base, in one vLLM server (multi-LoRA).

    python scripts/serve_multi_lora.py SMILE_DIR ADAPTERS_DIR [--base BASE_DIR] [--port P] [--host H] \
        [--python VLLM_PYTHON] [-- more vLLM server flags]

Each expert i is exported with `smile export SMILE_DIR ADAPTERS_DIR/expert<i> --expert i --as lora` (replacing
an earlier export), then vLLM's OpenAI-compatible server starts on the base with the adapters as models named
expert0, expert1, ...; a request names one of them (or the base's own name: no adapter) in "model". This is a
dense serving of the experts (one fine-tune per request, chosen by the client), not SMILE's routing.

vLLM 0.32 bug worked around: with max_loras equal to the number of adapters, a request without an adapter that
is batched with adapter requests silently gets the last slot's adapter; max_loras = adapters + 1 keeps that slot
empty. The base defaults to the one the SMILE folder was built from (its manifest), which must be a local folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smile_cli.cli import run
from smile_cli.errors import InputError
from smile_cli.export import open_smile
from smile_cli.serve import exec_server, vllm_python

# vLLM's accepted --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def export_adapters(smile_dir: Path, adapters_dir: Path) -> list[Path]:
    """Every expert of smile_dir as a LoRA adapter folder under adapters_dir, via the `smile export` CLI."""
    adapters = []
    for i in range(open_smile(smile_dir).num_experts):
        out = adapters_dir / f"expert{i}"
        code = run(["export", str(smile_dir), str(out), "--expert", str(i), "--as", "lora", "--force", "--quiet"])
        if code:
            raise SystemExit(code)
        adapters.append(out)
    return adapters


def max_lora_rank(adapters: list[Path]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's largest rank (r and rank_pattern)."""
    largest = 1
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        largest = max(largest, int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values()))
    for rank in VLLM_LORA_RANKS:
        if rank >= largest:
            return rank
    raise InputError(f"an expert has rank {largest}, above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")


def base_of(adapters: list[Path], base: Path | None) -> Path:
    """--base, else the base the adapters name (the SMILE folder's), which must be a local folder."""
    if base is None:
        named = json.loads((adapters[0] / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not named or not Path(named).is_dir():
            raise InputError(f"the adapters' base {named!r} is not a local folder: pass --base BASE_DIR")
        base = Path(named)
    return Path(base).expanduser().absolute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("smile_dir", type=Path)
    parser.add_argument("adapters_dir", type=Path)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--python", help="the vLLM venv's python (default: python -m smile_cli.vllm_env's)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        python = vllm_python(args.python)
        adapters = export_adapters(args.smile_dir.expanduser().absolute(), args.adapters_dir.expanduser().absolute())
        server = ["--model", str(base_of(adapters, args.base)), "--host", args.host, "--port", str(args.port)]
        server += ["--enforce-eager", "--enable-lora", "--max-loras", str(len(adapters) + 1)]
        server += ["--max-lora-rank", str(max_lora_rank(adapters)), "--lora-modules"]
        server += [f"expert{i}={path}" for i, path in enumerate(adapters)]
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exec_server(python, server + extra)
    return 1  # not reached: the server replaced this process


if __name__ == "__main__":
    sys.exit(main())
