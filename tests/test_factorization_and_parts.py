"""Randomized factorization, devices, read-ahead, and upscaling in parts (torchrun, --shard + assemble)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import folder_hashes, upscale_argv
from smile_cli.cli import run
from smile_cli.compute import UpdateFactorizer
from smile_cli.factorize import choose_method, exact_svd, randomized_svd, relative_error
from smile_cli.modeling.modeling_smile import smile_routing_weights
from smile_cli.prefetch import Prefetcher

SRC = Path(__file__).resolve().parent.parent


def decaying(out_f, in_f, seed, decay=15.0, noise=1e-3):
    """A matrix with a decaying spectrum, like a fine-tuning update."""
    g = torch.Generator().manual_seed(seed)
    rank = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(in_f, rank, generator=g)).Q
    s = torch.exp(-torch.arange(rank, dtype=torch.float32) / decay)
    return (u * s) @ v.T + noise * torch.randn(out_f, in_f, generator=g)


@pytest.mark.parametrize("shape", [(400, 160), (160, 400)], ids=["tall", "wide"])
@pytest.mark.parametrize("rank", [8, 32])
def test_randomized_close_to_exact(shape, rank):
    delta = decaying(*shape, seed=rank)
    approx = randomized_svd(delta, rank, seed=0)
    exact = exact_svd(delta, rank)
    assert approx.u.shape == (shape[0], rank) and approx.vh.shape == (rank, shape[1])
    assert relative_error(delta, approx) < 1.02
    assert relative_error(delta, exact) == pytest.approx(1.0, abs=1e-3)
    # the router's subspace: top-8 right singular vectors
    top = 8
    alignment = (exact.vh[:top] @ approx.vh[:top].T).square().sum() / top
    assert alignment > 0.98
    torch.testing.assert_close(approx.s, exact.s, rtol=1e-2, atol=1e-4)


def test_routing_agrees_with_exact():
    deltas = [decaying(300, 200, seed=10 + i) for i in range(3)]
    x = torch.randn(2000, 200, generator=torch.Generator().manual_seed(5))

    def choices(factorize):
        router = torch.cat([factorize(d, 32).vh[:4] for d in deltas])
        return smile_routing_weights(x, router, 3, 1).argmax(dim=1)

    agree = (choices(lambda d, r: randomized_svd(d, r, seed=0)) == choices(exact_svd)).float().mean()
    assert agree > 0.98


def test_randomized_deterministic_for_a_seed():
    delta = decaying(300, 120, seed=1)
    a, b = randomized_svd(delta, 16, seed=3), randomized_svd(delta.clone(), 16, seed=3)
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.vh, b.vh)
    assert not torch.equal(a.u, randomized_svd(delta, 16, seed=4).u)


def test_auto_method():
    assert choose_method("auto", 128, (4096, 14336)) == "randomized"
    assert choose_method("auto", 128, (256, 512)) == "exact"
    assert choose_method("exact", 8, (4096, 4096)) == "exact"


def test_factorizer_records_checks():
    fx = UpdateFactorizer("randomized", 0, "cpu", check_modules={"model.layers.0.mlp.up_proj": 0})
    for layer, seed in ((0, 2), (1, 3)):
        module, delta = f"model.layers.{layer}.mlp.up_proj", decaying(200, 100, seed=seed)
        factors = fx(delta, 8)
        if fx.checks_module(module):
            fx.check(module, delta, factors)
    report = fx.report()
    assert report["methods"] == {"randomized": 2}
    assert [c["module"] for c in report["error_ratio_checks"]] == ["model.layers.0.mlp.up_proj"]
    assert 1.0 <= report["max_error_ratio"] < 1.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_factorization_matches_cpu():
    delta = decaying(600, 300, seed=4)
    fx = UpdateFactorizer("randomized", 0, "cuda")
    got = fx(fx.to_device(delta), 16)
    assert got.u.device.type == "cpu"
    want = randomized_svd(delta, 16, seed=0)
    torch.testing.assert_close(got.s, want.s, rtol=1e-3, atol=1e-5)


def test_prefetcher_order_and_errors():
    keys = [("a", str(i)) for i in range(5)]
    p = Prefetcher(keys, lambda c, n: int(n) * 10, depth=1)
    assert [p.get(*k) for k in keys] == [0, 10, 20, 30, 40]
    p.close()

    def failing(c, n):
        if n == "2":
            raise ValueError("bad read")
        return n

    p = Prefetcher(keys, failing, depth=1)
    assert p.get(*keys[0]) == "0" and p.get(*keys[1]) == "1"
    with pytest.raises(ValueError, match="bad read"):
        p.get(*keys[2])
    p.close()
    p = Prefetcher(keys, lambda c, n: n, depth=1)
    p.close()  # closing early stops the thread


PARTS = ("--router-rank", "2", "--expert-rank", "4", "--max-shard-size", "40KB", "--svd", "randomized", "--quiet")


@pytest.fixture(scope="module")
def single_run(mistral_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    assert run(upscale_argv(*mistral_family, out, *PARTS)) == 0
    return out


def test_single_run_records_factorization(single_run):
    assert len(list(single_run.glob("model-*.safetensors"))) > 3
    card = (single_run / "README.md").read_text()
    assert (
        "--svd randomized" in card and "`model.layers.0.mlp.down_proj` (rank 4, randomized)" in card
    )  # first of its shape


def test_shard_parts_then_assemble_are_bitwise_identical(mistral_family, single_run, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(2):
        assert run(upscale_argv(*mistral_family, out, *PARTS, "--shard", f"{i}/2")) == 0
        assert not out.exists()
    capsys.readouterr()
    assert run(["assemble", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["factorization"]["error_ratio_checks"]
    assert folder_hashes(out) == folder_hashes(single_run)


def test_assemble_refuses_missing_part(mistral_family, tmp_path):
    out = tmp_path / "out"
    assert run(upscale_argv(*mistral_family, out, *PARTS, "--shard", "1/3")) == 0
    assert run(["assemble", str(out), "--quiet"]) == 2


def test_torchrun_two_processes_bitwise_identical(mistral_family, single_run, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    argv = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "smile_cli"]
    result = subprocess.run(
        [*argv, *upscale_argv(*mistral_family, out, *PARTS)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder_hashes(out) == folder_hashes(single_run)


@pytest.mark.parametrize(("shape", "rank"), [((300, 120), 8), ((120, 300), 40), ((64, 64), 60)])
def test_optimal_error_matches_float64_singular_values(shape, rank):
    from smile_cli.factorize import optimal_error

    g = torch.Generator().manual_seed(7)
    n = min(shape)
    spectrum = torch.logspace(0, -2, n, dtype=torch.float64)
    a = torch.linalg.qr(torch.randn(shape[0], n, generator=g, dtype=torch.float64)).Q @ torch.diag(spectrum)
    a = a @ torch.linalg.qr(torch.randn(shape[1], n, generator=g, dtype=torch.float64)).Q.T
    want = torch.linalg.svdvals(a)[rank:].square().sum().sqrt().item()
    assert optimal_error(a.float(), rank) == pytest.approx(want, rel=2e-3)
