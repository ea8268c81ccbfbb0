"""`smile upscale --device cuda` against `--device cpu` on the same inputs (skipped without CUDA; run by
benchmarks/gpu_check.sh on a GPU machine, `pytest -m cuda`).

The two devices run different floating-point kernels, so the bytes differ; what must agree is what the model
computes: each expert's kept update U_k S_k V_k^T, each router's subspace (its rows' projector), the shared weight
(bit for bit: it is copied, not computed), and the routed model's logits."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAITHFUL, upscaled
from synthetic_family import mistral_7b_config, write_family

# the device compared with the CPU; SMILE_TEST_DEVICE=cpu runs this file's logic on a machine without CUDA
DEVICE = os.environ.get("SMILE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA"),
]


def _tensors(folder):
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def _compare(cpu: dict, gpu: dict, experts: int, expert_rank: int, router_rank: int, tolerance: float) -> None:
    assert cpu.keys() == gpu.keys()
    modules = [k.removesuffix(".experts_u") for k in cpu if k.endswith(".experts_u")]
    assert modules
    for name in cpu:
        if not name.endswith((".experts_u", ".experts_svh", ".router.weight")):
            assert torch.equal(cpu[name], gpu[name]), name
    for m in modules:
        for t in range(experts):
            cols = slice(t * expert_rank, (t + 1) * expert_rank)
            kept = [s[m + ".experts_u"][:, cols].double() @ s[m + ".experts_svh"][cols].double() for s in (cpu, gpu)]
            error = (kept[0] - kept[1]).norm() / kept[0].norm()
            assert error < tolerance, (m, t, error.item())
            rows = slice(t * router_rank, (t + 1) * router_rank)
            routers = [s[m + ".router.weight"][rows].double() for s in (cpu, gpu)]
            projectors = [r.T @ torch.linalg.pinv(r @ r.T) @ r for r in routers]
            assert (projectors[0] - projectors[1]).norm() < tolerance * router_rank**0.5, (m, t)


@pytest.mark.parametrize(
    "width, expert_rank",
    [(256, 16), (1024, 128)],
    ids=["exact", "randomized"],  # --svd auto: exact SVDs for sides <= 512, the randomized SVD above
)
def test_cuda_upscale_computes_what_the_cpu_upscale_computes(tmp_path, width, expert_rank):
    config = mistral_7b_config(
        2,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
    )
    base, experts = write_family(tmp_path / "family", config, num_experts=2, dtype=torch.float32, spectrum="lowrank")
    ranks = ("--router-rank", "4", "--expert-rank", str(expert_rank), *FAITHFUL)
    devices = ("cpu", DEVICE)
    outs = [upscaled(base, experts, tmp_path / f"out{i}", *ranks, "--device", d, "-q") for i, d in enumerate(devices)]
    _compare(_tensors(outs[0]), _tensors(outs[1]), 2, expert_rank, 4, 2e-3)

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = []
    for out in outs:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
