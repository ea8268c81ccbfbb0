"""`smile serve`'s refusals and the vLLM venv builder, without vLLM (tests/test_vllm.py serves for real).

Every refusal is one line on stderr and exit 2, before any server starts (the CLI runs in-process, as
tests/helpers.smile does, except once as a subprocess, the way users run it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import FAITHFUL, smile, upscaled
from smile_cli import serve, vllm_env


@pytest.fixture(scope="module")
def smile_folders(mistral_family, tmp_path_factory):
    base, experts = mistral_family
    root = tmp_path_factory.mktemp("serve")
    options = ("--router-rank", "2", "--expert-rank", "4")
    return dict(
        base=base,
        faithful=upscaled(base, experts, root / "faithful", *options, *FAITHFUL),
        prompt=upscaled(base, experts, root / "prompt", *options, "--routing", "prompt-model"),
        default=upscaled(base, experts, root / "default", *options),
    )


def smile_serve(*argv, **env):
    command = [sys.executable, "-m", "smile_cli", "serve", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def one_line_exit_2(code: int, lines: list[str]) -> str:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def no_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("SMILE_VLLM_CACHE", str(tmp_path / "nothing"))
    monkeypatch.delenv("SMILE_VLLM_PYTHON", raising=False)


def test_missing_venv_says_how_to_build_it(smile_folders, tmp_path, capsys, no_venv):
    result = smile_serve(smile_folders["faithful"])  # as users run it
    line = one_line_exit_2(result.returncode, result.stderr.strip().splitlines())
    assert "no vLLM environment" in line and vllm_env.BUILD_COMMAND in line
    line = one_line_exit_2(*smile(capsys, "serve", smile_folders["faithful"], "--python", tmp_path / "no-python"))
    assert "no such python" in line


def test_prompt_modes_refused_unless_served_faithful(smile_folders, capsys, no_venv):
    line = one_line_exit_2(*smile(capsys, "serve", smile_folders["prompt"]))
    assert "'prompt-model', which vLLM cannot serve" in line and "--routing faithful" in line
    line = one_line_exit_2(*smile(capsys, "serve", smile_folders["prompt"], "--routing", "spectral-prompt"))
    assert "vLLM serves only faithful" in line
    # with --routing faithful the folder passes, and the next refusal is the missing venv
    line = one_line_exit_2(*smile(capsys, "serve", smile_folders["prompt"], "--routing", "faithful"))
    assert "no vLLM environment" in line


def test_default_output_is_served_with_its_engine_routing(smile_folders, capsys, no_venv):
    """The default (likelihood-prompt, one expert per request) names faithful for engines: it passes the routing
    check, and the next refusal is the missing venv; `smile serve` does not add an override (the model switches)."""
    config = json.loads((smile_folders["default"] / "config.json").read_text())
    assert config["smile_routing"] == "likelihood-prompt" and config["smile_engine_routing"] == "faithful"
    line = one_line_exit_2(*smile(capsys, "serve", smile_folders["default"]))
    assert "no vLLM environment" in line
    assert "--hf-overrides" not in serve.server_args(smile_folders["default"], host="h", port=1, routing=None, extra=[])


def test_not_a_smile_folder(smile_folders, tmp_path, capsys):
    one_line_exit_2(*smile(capsys, "serve", smile_folders["base"]))
    one_line_exit_2(*smile(capsys, "serve", tmp_path / "missing"))
    copy = tmp_path / "no-code"
    copy.mkdir()
    for f in smile_folders["faithful"].iterdir():
        if f.name != "modeling_smile.py":
            (copy / f.name).write_bytes(f.read_bytes())
    assert "modeling_smile.py: missing" in one_line_exit_2(*smile(capsys, "serve", copy))


def test_server_arguments(smile_folders):
    """The flags vLLM's Transformers backend needs; --routing becomes hf_overrides; the user's flags come last."""
    folder = smile_folders["prompt"]
    args = serve.server_args(folder, host="127.0.0.1", port=9, routing="faithful", extra=["--max-model-len", "64"])
    assert args[:6] == ["--model", str(folder), "--host", "127.0.0.1", "--port", "9"]
    assert {"--trust-remote-code", "--enforce-eager"} <= set(args)
    assert args[args.index("--model-impl") + 1] == "transformers"
    assert json.loads(args[args.index("--hf-overrides") + 1]) == {"smile_routing": "faithful"}
    assert args[-2:] == ["--max-model-len", "64"]
    assert "--hf-overrides" not in serve.server_args(folder, host="h", port=1, routing=None, extra=[])


def test_venv_build_failure_leaves_nothing_that_looks_built(tmp_path, monkeypatch):
    """A build whose pip install fails removes the half-built venv and leaves a note of why (the vLLM tests' skip
    reason); a marked venv counts as built and is not rebuilt."""
    monkeypatch.setenv("SMILE_VLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(vllm_env, "PINS", ("smile-cli-no-such-package==0.0.1",))
    venv = vllm_env.venv_dir()
    assert venv.parent == tmp_path and venv.name.startswith("vllm-")
    with pytest.raises(subprocess.CalledProcessError):
        vllm_env.build(quiet=True)
    assert not venv.exists() and not vllm_env.is_built()
    assert "smile-cli-no-such-package" in vllm_env.failure_note().read_text()
    assert vllm_env.main(["--print"]) == 1
    # a built one (its marker and python) is returned as it is, nothing run
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / vllm_env.MARKER).write_text("")
    monkeypatch.setattr(vllm_env, "_run", lambda *a: pytest.fail("rebuilt a built venv"))
    assert vllm_env.build(quiet=True) == venv / "bin" / "python"
    # other pins, another venv
    monkeypatch.setattr(vllm_env, "PINS", ("smile-cli-no-such-package==0.0.2",))
    assert vllm_env.venv_dir() != venv


def test_foreign_code_is_never_served(smile_folders, tmp_path, capsys):
    """vLLM would run the folder's code (trust_remote_code): a modeling file that is not smile's is refused."""
    copy = tmp_path / "foreign"
    copy.mkdir()
    for f in smile_folders["faithful"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "modeling_smile.py", "a") as f:
        f.write("\nimport os  # not smile's\n")
    line = one_line_exit_2(*smile(capsys, "serve", copy))
    assert "modeling_smile.py" in line and "no code but its own" in line
