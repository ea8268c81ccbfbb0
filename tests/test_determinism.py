"""Issue 11: the default factorization builds the paper's routers, and the same bytes come out whatever the
thread count (subprocess CLI runs under different OMP_NUM_THREADS, compared byte for byte)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL, folder_hashes, staging_of, upscale, upscale_argv
from reference import reference_model
from smile_cli.factorize import exact_svd, randomized_svd, singular_values, subspace_cosine_bound
from tiny_models import make_family

SRC = Path(__file__).resolve().parent.parent
CRASH = Path(__file__).parent / "crash_after_shards.py"
# one decoder layer large enough that --svd auto takes the randomized path for most projections (640 > 512)
MEDIUM = dict(hidden_size=640, intermediate_size=768, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
# --svd exact at small ranks, in several shards (resume and parts have files to keep)
SMALL_EXACT = ("--svd", "exact", "--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "8KB")


def env(threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def cli(threads: int, *argv, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "smile_cli", *map(str, argv)], capture_output=True, text=True, env=env(threads)
    )
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def upscale_in_parts(argv, *threads: int) -> None:
    """`smile upscale ARGV --shard i/N` for every part i of N = len(threads), part i on threads[i] threads."""
    for index, count in enumerate(threads):
        cli(count, *argv, "--shard", f"{index}/{len(threads)}")


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("medium"), "llama", **MEDIUM)


@pytest.fixture(scope="module")
def one_thread_run(medium_family, tmp_path_factory):
    base, experts = medium_family
    out = tmp_path_factory.mktemp("one") / "out"
    result = cli(1, *upscale_argv(base, experts, out, "--router-rank", "3", "--max-shard-size", "2MB", "--json"))
    summary = json.loads(result.stdout)["factorization"]
    # the --json summary reports the router's subspace accuracy beside the reconstruction error ratio
    assert summary["methods"]["randomized"] > 0 and summary["min_router_cosine"] >= 0.999, summary
    assert all(c["router_min_cosine"] >= 0.999 and c["error_ratio"] < 1.05 for c in summary["error_ratio_checks"])
    return folder_hashes(out)


@pytest.mark.parametrize("threads", [2, 4])
def test_default_mode_same_bytes_on_any_thread_count(medium_family, one_thread_run, tmp_path, threads):
    base, experts = medium_family
    out = tmp_path / "out"
    cli(threads, *upscale_argv(base, experts, out, "--router-rank", "3", "--max-shard-size", "2MB", "--quiet"))
    assert folder_hashes(out) == one_thread_run
    assert len([n for n in one_thread_run if n.endswith(".safetensors")]) > 2
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert "threads" not in manifest["numerics"] and manifest["numerics"]["math"].startswith("torch ")
    card = (out / "README.md").read_text()
    assert "randomized" in card and "router rank 3:" in card


def test_default_mode_parts_and_torchrun_give_the_single_runs_bytes(medium_family, one_thread_run, tmp_path):
    base, experts = medium_family
    out = tmp_path / "parts"
    argv = upscale_argv(base, experts, out, "--router-rank", "3", "--max-shard-size", "2MB", "--quiet")
    upscale_in_parts(argv, 2, 4)
    cli(1, "assemble", out, "--quiet")
    assert folder_hashes(out) == one_thread_run
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "torchrun"
    argv = upscale_argv(base, experts, out, "--router-rank", "3", "--max-shard-size", "2MB", "--quiet")
    group = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "smile_cli", *map(str, argv)]
    result = subprocess.run(group, capture_output=True, text=True, env=env(2), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_hashes(out) == one_thread_run


def test_exact_mode_records_threads_and_refuses_a_mix(tmp_path):
    """--svd exact's LAPACK SVD uses every thread: the manifest says how many, and parts or a resume made with
    another thread count are refused in one line (exit 2), touching nothing."""
    base, experts = make_family(tmp_path, "mistral")
    out = tmp_path / "out"
    argv = upscale_argv(base, experts, out, *SMALL_EXACT, "--quiet")
    upscale_in_parts(argv, 2, 1)
    staging = staging_of(out)
    before = folder_hashes(staging)
    result = cli(1, "assemble", out, "--quiet", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "2 thread(s), now" in lines[0], lines
    assert "1 thread(s)" in lines[0] and folder_hashes(staging) == before and not out.exists()
    # a part resumed with another thread count is refused too
    result = cli(2, *argv, "--shard", "1/2", "--resume", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot resume part 1/2" in lines[0], lines
    assert folder_hashes(staging) == before
    # redone with the same thread count: assembled, and the manifest records it
    cli(2, *argv, "--shard", "1/2")
    cli(1, "assemble", out, "--quiet")
    numerics = json.loads((out / "smile_manifest.json").read_text())["numerics"]
    assert numerics["threads"] == 2 and numerics["math"].startswith("torch ")


def test_exact_mode_single_run_resume_with_other_threads_refused(tmp_path):
    base, experts = make_family(tmp_path, "llama")
    out = tmp_path / "out"
    argv = [*map(str, upscale_argv(base, experts, out, *SMALL_EXACT)), "--quiet"]
    crashed = subprocess.run([sys.executable, str(CRASH), "3", *argv], env=env(2))
    assert crashed.returncode != 0
    staging = staging_of(out)
    before = folder_hashes(staging)
    result = cli(1, *argv, "--resume", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "1 thread(s) (--svd exact" in lines[0], lines
    assert folder_hashes(staging) == before
    cli(2, *argv, "--resume")
    assert json.loads((out / "smile_manifest.json").read_text())["numerics"]["threads"] == 2


# --- routers as the paper defines them -------------------------------------------------------------------------


def spectrum_matrix(shape, kind: str, seed: int) -> torch.Tensor:
    """Fine-tuning-like updates: 'lowrank' (rank 16 + noise, like tests/synthetic_family.py's) or 'decaying'
    (exponentially decaying spectrum + noise)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lowrank":
        b, a = torch.randn(shape[0], 16, generator=g), torch.randn(16, shape[1], generator=g)
        return 5e-4 * (b @ a) + 5e-4 * torch.randn(shape, generator=g)
    n = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], n, generator=g)).Q
    return (u * torch.exp(-torch.arange(n) / 15.0)) @ v.T + 1e-3 * torch.randn(shape, generator=g)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the row spaces of a and b (orthonormal rows)."""
    return torch.linalg.svdvals(a.double() @ b.double().T).min().item()


@pytest.mark.parametrize("kind", ["lowrank", "decaying"])
@pytest.mark.parametrize("shape", [(900, 600), (560, 1000)], ids=["tall", "wide"])
def test_randomized_router_subspace_matches_exact(kind, shape):
    delta = spectrum_matrix(shape, kind, seed=len(kind) + shape[0])
    exact = torch.linalg.svd(delta.double(), full_matrices=False)[2]  # the truth, in float64
    assert min_cosine(exact[:8], exact_svd(delta, 8).vh) > 0.99999  # the tool's exact mode
    values = singular_values(delta)
    for rank in (1, 4, 8, 128):
        approx = randomized_svd(delta, rank, seed=0)
        for router in range(1, min(rank, 8) + 1):
            cosine = min_cosine(exact[:router], approx.vh[:router])
            assert cosine >= 0.999, (rank, router, cosine)
        # the bound the model card reports is a true lower bound, and informative here
        bound = subspace_cosine_bound(delta, approx.vh[: min(rank, 8)], values)
        assert 0.99 <= bound <= min_cosine(exact[: min(rank, 8)], approx.vh[: min(rank, 8)]) + 1e-6  # float32 rows


def test_cosine_bound_is_a_lower_bound_even_when_far_off():
    delta = spectrum_matrix((300, 200), "decaying", seed=3)
    exact = torch.linalg.svd(delta.double(), full_matrices=False)[2]
    mixed = exact[:10].T @ torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rotated = torch.linalg.qr(mixed).Q.T
    bound = subspace_cosine_bound(delta, rotated)
    assert 0.0 <= bound <= min_cosine(exact[:4], rotated) + 1e-9 and min_cosine(exact[:4], rotated) < 0.99
    assert subspace_cosine_bound(delta, exact_svd(delta, 4).vh) > 0.9999


def routing_margins(reference, ids, top_k: int) -> torch.Tensor:
    """Per position, the smallest routing margin (gap between the top_k-th and the next router logit, float64
    reference) over every upscaled linear, taken over the position and every earlier one (attention mixes them)."""
    margins = []

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        w0, _, expert_weights, _, router_rank = module.args[:5]
        logits = []
        for w in expert_weights:
            vh = torch.linalg.svd(w.double() - w0.double(), full_matrices=False)[2][:router_rank]
            logits.append(torch.linalg.vector_norm(x @ vh.T, dim=1))
        ordered = torch.stack(logits, dim=1).sort(dim=1, descending=True).values
        gap = ordered[:, top_k - 1] - ordered[:, top_k] if top_k < ordered.shape[1] else torch.full_like(x[:, 0], 1e9)
        margins.append(gap.reshape(args[0].shape[:-1]))

    handles = [m.register_forward_pre_hook(hook) for m in reference.modules() if hasattr(m, "args")]
    with torch.no_grad():
        logits = reference(ids).logits
    for h in handles:
        h.remove()
    per_position = torch.stack(margins).min(dim=0).values  # (batch, length)
    return torch.cummin(per_position, dim=1).values, logits


# (router rank, expert rank, top-k): every router rank 1-8, expert ranks 1, 4, 8 and full, top-k 1-3
CASES = [(1, "1", 1), (2, "4", 2), (3, "8", 3), (4, "full", 1), (5, "1", 2), (6, "4", 3), (7, "8", 1), (8, "full", 2)]
CASES += [(8, "4", 3), (8, "8", 2), (8, "1", 1), (3, "full", 3)]


ARCHS = ["mistral", "llama", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_mode_matches_exact_and_reference(tmp_path, arch):
    """Every case on one of the three families (each family a third of them: the suite runs on 2 cores)."""
    base, experts = make_family(tmp_path, arch)
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    cases = CASES[ARCHS.index(arch) :: len(ARCHS)]
    compared = 0
    for index, (router, expert, top_k) in enumerate(cases):
        options = ["--router-rank", str(router), "--expert-rank", expert, "--top-k", str(top_k), *FAITHFUL, "--quiet"]
        models = {}
        for svd in ("auto", "exact"):
            out = tmp_path / f"{index}-{svd}"
            assert upscale(base, experts, out, "--svd", svd, *options) == 0
            model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
            with torch.no_grad():
                models[svd] = model(ids).logits.double()
            shutil.rmtree(out)
        reference = reference_model(base, experts, router, 0 if expert == "full" else int(expert), top_k)
        margins, want = routing_margins(reference, ids, top_k)
        clear = margins >= 2e-4
        assert clear.float().mean() > 0.5, (router, expert, top_k)
        scale = models["exact"][clear].abs().max()
        assert (models["auto"] - models["exact"])[clear].abs().max() <= 1e-4 * scale, (router, expert, top_k)
        assert (models["auto"] - want)[clear].abs().max() <= 1e-4 * want[clear].abs().max(), (router, expert, top_k)
        compared += 1
    assert compared == len(cases) == 4
