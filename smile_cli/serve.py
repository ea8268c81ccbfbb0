"""`smile serve`: a SMILE folder behind vLLM's OpenAI-compatible server, run by the vLLM venv's python.

vLLM cannot live in the project's environment (it pins its own torch and transformers), so the server runs in
the venv that `python -m smile_cli.vllm_env` builds (or the python of --python / SMILE_VLLM_PYTHON). vLLM loads
the folder through its Transformers backend, which runs the folder's own modeling_smile.py (trust_remote_code):
the flags below are the ones that path needs. The prompt routing modes cannot be served (vLLM packs requests into
one sequence and keeps the KV cache itself): a folder built with one runs its config's smile_engine_routing
(faithful, written by `smile upscale --routing auto` beside the prompt mode it chose), and without one is refused
here unless --routing faithful serves it with the paper's per-token router (the model itself does the same when vLLM
builds it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from smile_cli import vllm_env
from smile_cli.errors import InputError

PYTHON_ENV = "SMILE_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
log = logging.getLogger("smile")
SERVABLE_ROUTING = ("faithful", "calibrated")  # modeling_smile.PER_TOKEN_ROUTING: no per-request state
# vLLM's defaults that do not suit a SMILE folder on its CPU build: no usage report leaves the machine.
ENGINE_ENV = {"VLLM_NO_USAGE_STATS": "1"}


def vllm_python(python: str | os.PathLike | None = None) -> Path:
    """The python of the vLLM venv: python (--python), else $SMILE_VLLM_PYTHON, else the built venv's."""
    chosen = python or os.environ.get(PYTHON_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: no such python (the vLLM venv's; build one with {vllm_env.BUILD_COMMAND})")
        return path
    if not vllm_env.is_built():
        raise InputError(
            f"no vLLM environment at {vllm_env.venv_dir()}: build it with `{vllm_env.BUILD_COMMAND}` "
            f"(about 3 minutes, 3.5 GB), or pass --python / set {PYTHON_ENV}"
        )
    return vllm_env.venv_python()


def folder_routing(model_dir: Path) -> str:
    """The folder's routing mode (config.json smile_routing; faithful when absent), after checking it is a
    SMILE folder."""
    return open_smile_config(model_dir).get("smile_routing") or "faithful"


def open_smile_config(model_dir: Path) -> dict:
    from smile_cli.export import open_smile

    return open_smile(model_dir).config


def server_args(
    model_dir: Path, *, host: str, port: int, routing: str | None, extra: list[str], model: Path | None = None
) -> list[str]:
    """The arguments of vLLM's OpenAI-compatible server for the SMILE folder model_dir (model: what --model names,
    model_dir unless a recipe serves another folder); extra (the user's own vLLM flags) come last, so they win."""
    args = ["--model", str(model or model_dir), "--host", host, "--port", str(port)]
    args += ["--trust-remote-code", "--model-impl", "transformers", "--enforce-eager"]
    if routing is not None:
        args += ["--hf-overrides", json.dumps({"smile_routing": routing})]
    return args + list(extra)


def check_routing(model_dir: Path, routing: str | None) -> None:
    """Refuse a routing vLLM cannot serve: --routing other than a per-token mode, or a prompt mode without --routing
    unless the folder names the per-token mode engines run instead (config.json smile_engine_routing)."""
    if routing is not None and routing not in SERVABLE_ROUTING:
        raise InputError(f"--routing {routing!r}: vLLM serves only {', '.join(SERVABLE_ROUTING)} routing")
    built = folder_routing(model_dir)
    if routing == "calibrated" and not open_smile_config(model_dir).get("smile_calibrated_routers"):
        raise InputError(f"--routing calibrated: {model_dir} has no calibrated routers (built without --calibrate)")
    engine = open_smile_config(model_dir).get("smile_engine_routing")
    if routing is None and built not in SERVABLE_ROUTING and engine in SERVABLE_ROUTING:
        log.info("%s routes with %r; vLLM serves it with %r (smile_engine_routing)", model_dir, built, engine)
    elif routing is None and built not in SERVABLE_ROUTING:
        raise InputError(
            f"{model_dir} routes with {built!r}, which vLLM cannot serve (it packs requests into one sequence): "
            "pass --routing faithful to serve it with the paper's per-token router, or run it with transformers"
        )


def exec_server(python: Path, args: list[str]) -> None:
    """Replace this process by the server (signals reach it directly: SIGTERM stops it)."""
    env = {**ENGINE_ENV, **os.environ}
    argv = [str(python), "-m", SERVER_MODULE, *args]
    os.execve(argv[0], argv, env)


def serve(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    routing: str | None = None,
    python: str | None = None,
    extra: list[str] = (),
) -> None:
    """Check the folder and the venv, then become vLLM's OpenAI-compatible server for model_dir (never returns)."""
    from smile_cli.trust import check_own_code

    model_dir = Path(model_dir).expanduser().absolute()
    # vLLM runs the folder's code with trust_remote_code: it must be this smile version's own, byte for byte
    check_own_code(model_dir)
    check_routing(model_dir, routing)
    exec_server(vllm_python(python), server_args(model_dir, host=host, port=port, routing=routing, extra=list(extra)))
