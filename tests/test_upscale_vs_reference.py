"""Upscale tiny models through the CLI, load them with transformers, compare with the float64 reference."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL, upscale, upscale_argv
from reference import reference_model
from tiny_models import make_family

ARCHS = [
    ("mistral", {}),
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
]


# --svd exact: these tests check the SMILE math against an exact float64 reference
EXACT = ("--svd", "exact", *FAITHFUL, "--quiet")  # the reference's router


def load(out, **kwargs):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs).eval()


def input_ids(vocab=96, batch=2, length=7, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("arch", "overrides"), ARCHS, ids=["mistral", "llama", "llama-bias", "qwen2"])
@pytest.mark.parametrize(("router_rank", "expert_rank", "top_k"), [(2, 4, 1), (4, 8, 2)])
def test_logits_match_float64_reference(tmp_path, arch, overrides, router_rank, expert_rank, top_k):
    base, experts = make_family(tmp_path, arch, **overrides)
    out = tmp_path / "out"
    assert (
        upscale(
            base,
            experts,
            out,
            *EXACT,
            "--router-rank",
            str(router_rank),
            "--expert-rank",
            str(expert_rank),
            "--top-k",
            str(top_k),
        )
        == 0
    )
    model = load(out)
    reference = reference_model(base, experts, router_rank, expert_rank, top_k)
    ids = input_ids()
    with torch.no_grad():
        got = model(ids).logits.double()
        want = reference(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the reference really differs from the base: the experts matter
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    with torch.no_grad():
        assert (base_model(ids).logits - want).abs().max() > 1e-2


def test_full_rank_expert_reproduces_routed_expert_exactly(tmp_path):
    base, experts = make_family(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    out = tmp_path / "out"
    # the smallest projection is 16 x 32 (k/v): rank 16 is the full rank of every update there, not of all
    assert upscale(base, experts, out, *EXACT, "--router-rank", "4", "--expert-rank", "16") == 0
    model = load(out, dtype=torch.float32)
    from safetensors.torch import load_file

    states = [load_file(f"{e}/model.safetensors") for e in experts]
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    for name in ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]:
        layer = model.get_submodule(name)
        with torch.no_grad():
            chosen = layer.router(x).argmax(dim=1)
            y = layer(x)
        for i, state in enumerate(states):
            rows = chosen == i
            want = x[rows] @ state[name + ".weight"].T + state[name + ".bias"]
            torch.testing.assert_close(y[rows], want, rtol=1e-4, atol=1e-4)
        assert len(set(chosen.tolist())) > 1  # tokens really are routed to several experts


def test_dense_experts_match_reference(tmp_path):
    base, experts = make_family(tmp_path, "qwen2")
    out = tmp_path / "out"
    assert upscale(base, experts, out, *EXACT, "--router-rank", "2", "--expert-rank", "full") == 0
    model = load(out)
    assert model.config.rank_of_expert == 0
    reference = reference_model(base, experts, 2, 0, 1)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_single_expert_is_compression_of_its_update(tmp_path):
    base, experts = make_family(tmp_path, "mistral", num_experts=1)
    out = tmp_path / "out"
    assert upscale(base, experts, out, *EXACT, "--expert-rank", "4") == 0
    model = load(out)
    assert not any("router" in n for n, _ in model.named_parameters())
    reference = reference_model(base, experts, 8, 4, 1)
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_bfloat16_generate_sdpa_and_save_pretrained_round_trip(tmp_path):
    base, experts = make_family(tmp_path, "mistral", dtype=torch.bfloat16)
    out = tmp_path / "out"
    assert upscale(base, experts, out, *EXACT, "--router-rank", "2", "--expert-rank", "4") == 0
    model = load(out, dtype=torch.bfloat16, attn_implementation="sdpa")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.router.weight.dtype == torch.float32  # routing in float32
    assert layer.experts_u.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    ids = input_ids()
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 12)
    # the KV-cache path gives the same tokens as recomputing the whole sequence each step
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            next_token = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(seq, generated)
    model.save_pretrained(tmp_path / "again")
    again = load(tmp_path / "again", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_subprocess_cli_writes_loadable_model(tmp_path, mistral_family):
    base, experts = mistral_family
    out = tmp_path / "out"
    argv = upscale_argv(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--svd", "exact")
    result = subprocess.run(
        [sys.executable, "-m", "smile_cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)  # nothing on stdout but the result
    assert "wrote" in result.stderr
    load(out)
