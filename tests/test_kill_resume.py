"""kill -9 a real `smile upscale` process at random moments, then --resume: the result is bitwise identical
to an uninterrupted run, every file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import folder_hashes, staging_of, upscale, upscale_argv
from tiny_models import make_family

TRIALS = 10
OPTIONS = ["--router-rank", "4", "--expert-rank", "8", "--max-shard-size", "40KB"]


@pytest.fixture(scope="module")
def bigger_family(tmp_path_factory):
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    return make_family(tmp_path_factory.mktemp("big"), "llama", **shape)


def _kill_at_random(argv: list[str], out: Path, delay: float) -> str:
    """Start the CLI, wait until it has begun writing, sleep `delay`, kill -9; what the kill interrupted."""
    src = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "smile_cli", *argv, "--quiet"], env=env)
    deadline = time.monotonic() + 60
    while not staging_of(out).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    finished = process.poll() is not None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return "finished" if finished else "killed"


def test_kill_9_then_resume_is_bitwise_identical(tmp_path, bigger_family):
    base, experts = bigger_family
    clean = tmp_path / "clean"
    started = time.perf_counter()
    assert upscale(base, experts, clean, *OPTIONS, "--quiet") == 0
    compute = time.perf_counter() - started
    want = folder_hashes(clean)
    assert sum(n.endswith(".safetensors") for n in want) >= 6

    rng = random.Random(1234)
    outs = [tmp_path / f"trial{i}" for i in range(TRIALS)]
    delays = [rng.uniform(0, 1.2 * compute) for _ in outs]
    with ThreadPoolExecutor(2) as pool:
        what = list(
            pool.map(
                lambda job: _kill_at_random(list(map(str, upscale_argv(base, experts, job[0], *OPTIONS))), *job),
                zip(outs, delays, strict=True),
            )
        )
    kept_shards = []
    for out in outs:
        staging = staging_of(out)
        kept_shards.append(len(list(staging.glob("*.safetensors"))) if staging.exists() else None)
        assert upscale(base, experts, out, *OPTIONS, "--resume", "--quiet") == 0
        assert folder_hashes(out) == want, f"{out.name}: killed after {delays[outs.index(out)]:.2f} s"
        assert not staging.exists()
    # the kills really hit runs in progress, some of them after shards were complete
    assert what.count("killed") >= TRIALS // 2, what
    assert sum(1 for k in kept_shards if k) >= 3, kept_shards
