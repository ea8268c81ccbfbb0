"""SMILE outputs served by vLLM (0.32, CPU build), token for token against transformers' generate().

vLLM runs for real, in its own venv (`python -m smile_cli.vllm_env`; .ci/run builds it), as a subprocess: the
engine runs tests/vllm_driver.py, the server is started with `smile serve` and with scripts/serve_multi_lora.py,
queried over HTTP on 127.0.0.1, then stopped. The references are computed here, in the main environment, with
transformers' generate(): one prompt alone, greedy, no eos, as many tokens as vLLM is asked for. The tiny models
have head_dim 32 (vLLM's CPU attention needs >= 32). Engine starts cost 20-45 s each, so every engine serves many
checks: one driver run (three engines) and two server starts for the whole file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import upscaled
from smile_cli import vllm_env
from tiny_experts import models
from tiny_experts import tasks as T
from tiny_models import make_family

ROOT = Path(__file__).resolve().parents[1]


def _skip_reason() -> str | None:
    if vllm_env.is_built():
        return None
    note = vllm_env.failure_note()
    failed = note.read_text().strip().splitlines() if note.is_file() else []
    how = f"its build failed: {failed[-1]}" if failed else f"build it with {vllm_env.BUILD_COMMAND} (.ci/run does)"
    return f"vLLM venv not built at {vllm_env.venv_dir()}: {how}"


pytestmark = [pytest.mark.vllm, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

# head_dim = 128 / 4 = 32; the character tokenizer's vocabulary (the server detokenizes what it generates)
SHAPE = dict(
    vocab_size=T.VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=192,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
LLM_ARGS = dict(trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=256, seed=0, max_num_seqs=8)
# a 64-token step budget chunks the long prompts' prefill; 32-token blocks let a 100-token prefix be cached
CHUNKED_PREFIX = dict(max_num_batched_tokens=64, enable_chunked_prefill=True, enable_prefix_caching=True, block_size=32)
PREFIX = 100


def prompts(seed: int, lengths) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, T.VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


def reference(folder: Path, prompt_list, max_new_tokens: int, **overrides) -> list[list[int]]:
    """transformers' greedy generate() of each prompt alone, without eos: max_new_tokens tokens each."""
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **overrides)
    # no eos on the model's own generation config (a generation_config passed to generate() is merged with it)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, T.PAD
    tokens = []
    for prompt in prompt_list:
        ids = torch.tensor([prompt])
        out = model.eval().generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
        assert out.shape[1] == len(prompt) + max_new_tokens
        tokens.append(out[0, len(prompt) :].tolist())
    return tokens


# how vLLM runs the default output: its engine routing (config.json smile_engine_routing), the paper's router
SERVED = {"smile_routing": "faithful"}


def engine_env() -> dict:
    return {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Llama and Qwen2 bases with three experts each: the Llama upscaled with the default routing (what
    `smile upscale` picks: likelihood-prompt, served by vLLM as faithful), the Qwen2 with --routing prompt-model
    (given by name: vLLM must refuse it); expert rank 16 (the
    default, 128, exceeds the tiny k_proj's 64 outputs)."""
    root = tmp_path_factory.mktemp("vllm")
    made = {}
    for arch, routing in (("llama", ()), ("qwen2", ("--routing", "prompt-model"))):
        base, experts = make_family(root / arch, arch, **SHAPE)
        models.save_char_tokenizer(base)
        made[arch] = dict(
            base=base,
            experts=experts,
            smile=upscaled(base, experts, root / arch / "smile", "--expert-rank", "16", *routing),
        )
    return made


@pytest.fixture(scope="module")
def cases():
    return dict(
        batch=prompts(1, [3, 9, 17, 30]),  # 59 tokens: one packed step of the 64-token budget
        prefix=[p + s for p in prompts(2, [PREFIX]) for s in prompts(3, [1, 2])],
        first=prompts(4, [5])[0],
        later=prompts(5, [12, 40]),
        qwen=prompts(6, [4, 11, 25]),
    )


@pytest.fixture(scope="module")
def engine_runs(folders, cases, tmp_path_factory):
    """One driver run in the vLLM venv: the Qwen2 prompt-model folder as it is (refused), the same with
    hf_overrides faithful, and the Llama default folder with chunked prefill and prefix caching."""
    work = tmp_path_factory.mktemp("driver")
    llama = str(folders["llama"]["smile"])
    qwen = str(folders["qwen2"]["smile"])
    job = {
        "out": str(work / "results.json"),
        "runs": [
            {"model": qwen, "llm": LLM_ARGS, "tasks": []},
            {
                "model": qwen,
                "llm": {**LLM_ARGS, "hf_overrides": {"smile_routing": "faithful"}},
                "tasks": [{"kind": "batch", "prompts": cases["qwen"], "max_tokens": 8}],
            },
            {
                "model": llama,
                "llm": {**LLM_ARGS, **CHUNKED_PREFIX},
                "tasks": [
                    {"kind": "batch", "prompts": cases["batch"], "max_tokens": 10},
                    {"kind": "one_by_one", "prompts": cases["prefix"], "max_tokens": 6},
                    {"kind": "arrival", "first": cases["first"], "later": cases["later"], "after_steps": 4}
                    | {"max_tokens": 12},
                ],
            },
        ],
    }
    (work / "job.json").write_text(json.dumps(job))
    log = work / "driver.log"
    with open(log, "w") as out:
        result = subprocess.run(
            [str(vllm_env.venv_python()), str(ROOT / "tests" / "vllm_driver.py"), str(work / "job.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=engine_env(),
            timeout=900,
        )
    text = log.read_text()
    assert result.returncode == 0, text[-4000:]
    return json.loads((work / "results.json").read_text()), text


def test_default_routing_is_served(folders, engine_runs):
    """The default output is one vLLM serves: its prompt mode (one expert per request) is replaced, with a warning,
    by the per-token router its config names for engines; the tokens below are the faithful ones."""
    config = json.loads((folders["llama"]["smile"] / "config.json").read_text())
    assert config["smile_routing"] == "likelihood-prompt" and config["smile_engine_routing"] == "faithful"
    _, log = engine_runs
    assert "vLLM serves this model with smile_routing 'faithful' (config.json smile_engine_routing)" in log


def test_concurrent_requests_of_different_lengths(folders, cases, engine_runs):
    results, _ = engine_runs
    batch = results[2]["tasks"][0]["tokens"]
    assert batch == reference(folders["llama"]["smile"], cases["batch"], 10, **SERVED)


def test_chunked_prefill_and_prefix_caching(folders, cases, engine_runs):
    """Two 101- and 102-token prompts sharing a 100-token prefix, one after the other: the first is prefilled in
    chunks (64-token budget), the second finds the prefix's blocks cached; both give transformers' tokens."""
    results, _ = engine_runs
    task = results[2]["tasks"][1]
    assert task["cached"][0] == 0 and task["cached"][1] >= 64, task["cached"]
    assert task["tokens"] == reference(folders["llama"]["smile"], cases["prefix"], 6, **SERVED)


def test_requests_arriving_while_others_decode(folders, cases, engine_runs):
    results, _ = engine_runs
    task = results[2]["tasks"][2]
    assert 1 <= task["first_tokens_before"] < 12  # the first request was decoding when the others arrived
    expected = reference(folders["llama"]["smile"], [cases["first"], *cases["later"]], 12, **SERVED)
    assert task["tokens"] == expected


def test_prompt_mode_refused_at_load_time(engine_runs):
    """vLLM builds the model, the model refuses: the engine never starts, the message says what to do."""
    results, log = engine_runs
    assert "load_error" in results[0] and "tasks" not in results[0]
    message = "smile_routing 'prompt-model' cannot be served by vLLM"
    assert message in log and 'hf_overrides={"smile_routing": "faithful"}' in log
    assert "--routing faithful" in log
    before_second_engine = log.split("'hf_overrides': {'smile_routing': 'faithful'}")[0]
    assert message in before_second_engine and "SmileRoutingError" in before_second_engine


def test_qwen2_prompt_mode_served_faithful_by_override(folders, cases, engine_runs):
    results, _ = engine_runs
    tokens = results[1]["tasks"][0]["tokens"]
    assert tokens == reference(folders["qwen2"]["smile"], cases["qwen"], 8, smile_routing="faithful")


# ------------------------------------------------------------------------------------------- servers over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, path: str, body: dict | None = None, timeout: float = 120):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class Server:
    """A server process started by a command (smile serve, the multi-LoRA recipe), stopped with SIGTERM."""

    def __init__(self, argv: list[str], log: Path, port: int):
        self.port, self.log = port, log
        self.out = open(log, "w")
        self.process = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, env=engine_env())

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited {self.process.returncode}: {self.tail()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise AssertionError(f"server not ready after {timeout} s: {self.tail()}")

    def complete(self, model: str, prompt: list[int], max_tokens: int) -> list[int]:
        body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        answer = http(self.port, "/v1/completions", body | {"return_token_ids": True})
        return answer["choices"][0]["token_ids"]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.out.close()
        return self.process.returncode

    def tail(self) -> str:
        self.out.flush()
        return self.log.read_text()[-3000:]


def concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_smile_serve_openai_server(folders, tmp_path):
    """`smile serve` (the CLI, as users run it) starts the OpenAI-compatible server; three requests of different
    lengths sent at once get transformers' tokens; SIGTERM stops it and frees the port."""
    folder, port = folders["llama"]["smile"], free_port()
    argv = [sys.executable, "-m", "smile_cli", "serve", str(folder), "--port", str(port)]
    server = Server(argv + ["--", "--dtype", "float32", "--max-num-seqs", "8"], tmp_path / "server.log", port)
    try:
        server.wait_ready()
        (served,) = [m["id"] for m in http(port, "/v1/models")["data"]]
        batch = prompts(7, [2, 13, 33])
        tokens = concurrently([lambda p=p: server.complete(served, p, 9) for p in batch])
    finally:
        code = server.stop()
    assert tokens == reference(folder, batch, 9, **SERVED)
    assert code in (0, -signal.SIGTERM), server.tail()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more


def test_multi_lora_recipe(folders, tmp_path):
    """scripts/serve_multi_lora.py: every expert as a LoRA adapter of the base in one server; requests for each
    adapter and for the base alone, sent at once, get the tokens of the expert's dense export (and of the base)."""
    folder, base, port = folders["llama"]["smile"], folders["llama"]["base"], free_port()
    argv = [sys.executable, str(ROOT / "scripts" / "serve_multi_lora.py"), str(folder), str(tmp_path / "adapters")]
    argv += ["--port", str(port), "--", "--dtype", "float32", "--max-num-seqs", "8"]
    server = Server(argv, tmp_path / "server.log", port)
    batch = prompts(8, [6, 19, 27, 11])
    models_of_requests = ["expert0", "expert1", "expert2", str(base)]
    try:
        server.wait_ready()
        served = {m["id"] for m in http(port, "/v1/models")["data"]}
        assert served == set(models_of_requests), served
        tokens = concurrently(
            [lambda m=m, p=p: server.complete(m, p, 8) for m, p in zip(models_of_requests, batch, strict=True)]
        )
    finally:
        server.stop()
    expected = []
    for i, prompt in enumerate(batch[:3]):
        dense = tmp_path / f"dense{i}"
        code = subprocess.run(
            [sys.executable, "-m", "smile_cli", "export", str(folder), str(dense), "--expert", str(i), "--as", "dense"],
            env=engine_env(),
        ).returncode
        assert code == 0
        expected += reference(dense, [prompt], 8)
    expected += reference(base, [batch[3]], 8)
    assert tokens == expected
    config = json.loads((tmp_path / "adapters" / "expert0" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
