"""SMILE models for the benchmark, built with the project's own `smile upscale` command.

The CLI runs in-process (smile_cli.cli.run(argv): the same code path as the `smile` console script, without
paying Python start-up for each of the grid's points); the output folder is then loaded exactly as a user
would: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).
"""

import contextlib
import io
from pathlib import Path


def upscale_argv(base, experts, out, router_rank, expert_rank, top_k, *extra) -> list[str]:
    return [
        "upscale",
        "--base", str(base),
        "--experts", ",".join(str(e) for e in experts),
        "--out", str(out),
        "--router-rank", str(router_rank),
        "--expert-rank", str(expert_rank),
        "--top-k", str(top_k),
        "--dtype", "float32",
        "--force",
        "--quiet",
        *extra,
    ]  # fmt: skip


def upscale(base, experts, out: Path, router_rank, expert_rank, top_k: int, extra=()) -> Path:
    """Run `smile upscale ...` (plus the options in extra) into out (replaced if present); raises with the
    CLI's stderr on failure."""
    from smile_cli.cli import run

    argv = upscale_argv(base, experts, out, router_rank, expert_rank, top_k, *map(str, extra))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run(argv)
    if rc != 0:
        raise RuntimeError(f"smile {' '.join(argv)} failed (exit {rc}): {err.getvalue().strip()}")
    return Path(out)
