"""PEFT LoRA adapters as experts: exact factors, PEFT's scaling rules, validation, and end to end."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL
from reference import reference_model
from smile_cli.cli import run
from smile_cli.errors import InputError
from smile_cli.inputs.experts import open_expert
from smile_cli.inputs.local import open_checkpoint
from smile_cli.inputs.lora import lora_factors, module_scale, open_adapter
from tiny_lora import make_lora
from tiny_models import make_base, make_expert, tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# adapter 0: every projection, rank and alpha patterns; adapter 1: rsLoRA on three projections only
ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"down_proj": 6}, alpha_pattern={"layers.1.*q_proj": 3}),
    dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
]


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A tiny Llama with biases, two LoRA adapters (and their merged dense fine-tunes), one full fine-tune."""
    root = tmp_path_factory.mktemp("lora")
    base = make_base(root / "base", tiny_config("llama", attention_bias=True, mlp_bias=True))
    adapters, merged, scalings = [], [], []
    for i, kwargs in enumerate(ADAPTERS):
        adapters.append(root / f"adapter{i}")
        merged.append(root / f"merged{i}")
        scalings.append(make_lora(base, adapters[-1], seed=10 + i, merged=merged[-1], **kwargs))
    full = make_expert(base, root / "full", seed=7)
    return dict(base=base, adapters=adapters, merged=merged, full=full, scalings=scalings)


@pytest.mark.parametrize("rank", [2, 5, 9])
def test_factors_equal_dense_update_in_float64(rank):
    g = torch.Generator().manual_seed(0)
    b, a, scale = torch.randn(24, 5, generator=g), torch.randn(5, 40, generator=g), 0.7
    dense = scale * b.double() @ a.double()
    f = lora_factors(b, a, scale, rank)
    assert f.u.shape == (24, rank) and f.s.shape == (rank,) and f.vh.shape == (rank, 40)
    want = torch.linalg.svdvals(dense)[: min(rank, 5)]
    torch.testing.assert_close(f.s[: min(rank, 5)].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(f.s[5:] == 0) and torch.all(f.u[:, 5:] == 0) and torch.all(f.vh[5:] == 0)
    torch.testing.assert_close(f.vh[:5] @ f.vh[:5].T if rank >= 5 else f.vh @ f.vh.T, torch.eye(min(rank, 5)))
    approx = (f.u.double() * f.s.double()) @ f.vh.double()
    if rank >= 5:  # the update has rank 5: exact
        torch.testing.assert_close(approx, dense, rtol=1e-5, atol=1e-5)
    else:  # the optimal rank-k error (Eckart-Young)
        optimal = torch.linalg.svdvals(dense)[rank:].square().sum().sqrt()
        torch.testing.assert_close(torch.linalg.matrix_norm(dense - approx), optimal, rtol=1e-5, atol=1e-6)


def test_factors_never_form_the_dense_update():
    """Every tensor lora_factors computes has at most r (= 6) rows or columns: no 300 x 200 matrix."""
    from torch.overrides import TorchFunctionMode

    shapes = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, tuple) else (result,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return result

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(300, 6, generator=g), torch.randn(6, 200, generator=g)
    with Record():
        f = lora_factors(b, a, 0.5, 8)
    assert (300, 6) in shapes and (6, 200) in shapes  # the mode saw the computation
    assert all(min(shape) <= 8 for shape in shapes if len(shape) == 2), sorted(set(shapes))
    torch.testing.assert_close((f.u * f.s) @ f.vh, 0.5 * b @ a, rtol=1e-4, atol=1e-4)


def test_scales_follow_peft_rank_alpha_patterns_and_rslora(lora_family):
    for adapter, scalings in zip(lora_family["adapters"], lora_family["scalings"], strict=True):
        lora = open_adapter(str(adapter), adapter, None)
        for module, entry in lora.modules.items():
            assert entry.scale == pytest.approx(scalings["base_model.model." + module]), module
            r, _ = module_scale(lora.adapter_config, module)
            assert r == entry.rank
    first = open_adapter("a", lora_family["adapters"][0], None)
    assert first.modules["model.layers.0.mlp.down_proj"].rank == 6
    assert first.modules["model.layers.1.self_attn.q_proj"].scale == pytest.approx(3 / 4)
    assert len(open_adapter("b", lora_family["adapters"][1], None).modules) == 2 * 3


@pytest.mark.parametrize(("router_rank", "expert_rank", "top_k"), [(2, 4, 1), (4, 8, 2)])
def test_loras_and_full_finetune_match_float64_reference(tmp_path, lora_family, router_rank, expert_rank, top_k):
    f = lora_family
    experts = [f["adapters"][0], f["full"], f["adapters"][1]]
    out = tmp_path / "out"
    argv = ["upscale", "--base", f["base"], "--experts", ",".join(map(str, experts)), "--out", out, "--svd", "exact"]
    argv += ["--router-rank", router_rank, "--expert-rank", expert_rank, "--top-k", top_k, *FAITHFUL, "--quiet"]
    assert run([str(a) for a in argv]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    # the dense weights peft's merge gives; tol drops the float32 rounding noise of the merged low-rank updates
    merged = [f["merged"][0], f["full"], f["merged"][1]]
    reference = reference_model(f["base"], merged, router_rank, expert_rank, top_k, tol=1e-5)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)
    from smile_cli.plan import LinearRanks

    config = json.loads((out / "config.json").read_text())
    up = LinearRanks.of_config(config, "model.layers.0.mlp.up_proj")
    layer = model.model.layers[0].mlp.up_proj  # untouched by adapter 1: zero router rows, one zero factor row
    assert up.experts[2] == 1 and not layer.router.weight[2 * router_rank :].any()
    assert not layer.experts_u[:, up.expert_rows(2)].any()
    assert not layer.experts_bias[0].any() and not layer.experts_bias[2].any()  # LoRA leaves biases alone
    # an expert rank above the LoRA rank: clamped to it (no all-zero rows), the full fine-tune keeps its rank
    q = LinearRanks.of_config(config, "model.layers.0.self_attn.q_proj")
    assert q.experts == (min(expert_rank, 4), expert_rank, min(expert_rank, 8))


def test_dense_experts_from_lora(tmp_path, lora_family):
    f = lora_family
    out = tmp_path / "out"
    argv = ["upscale", "--base", f["base"], "--experts", f"{f['adapters'][0]},{f['adapters'][1]}", "--out", out]
    assert run([str(a) for a in [*argv, "--router-rank", "2", "--expert-rank", "full", *FAITHFUL, "--quiet"]]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    reference = reference_model(f["base"], f["merged"], 2, 0, 1, tol=1e-5)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_adapter_of_other_base_warns_and_bad_adapters_are_refused(tmp_path, lora_family, caplog):
    from smile_cli.options import UpscaleOptions
    from smile_cli.planning import build_plan

    f = lora_family
    adapter = tmp_path / "renamed"
    shutil.copytree(f["adapters"][1], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    options = UpscaleOptions(base=str(f["base"]), experts=[str(adapter), str(f["full"])], router_rank=2, expert_rank=4)
    base, experts = open_checkpoint(options.base), [open_expert(e) for e in options.experts]
    plan = build_plan(options, base, experts)
    assert any("someone/other-model" in w for w in plan.warnings)
    own = open_expert(str(f["adapters"][0]))
    assert not any("trained on" in w for w in build_plan(options, base, [own, experts[1]]).warnings)

    # an adapter of a wider model: factor shapes do not match
    wide = make_base(tmp_path / "wide", tiny_config("llama", hidden_size=64, attention_bias=True, mlp_bias=True))
    make_lora(wide, tmp_path / "wide_adapter", seed=1, r=4, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(InputError, match="shapes A"):
        build_plan(options, base, [open_expert(str(tmp_path / "wide_adapter")), experts[1]])
    # factors of a module that is not an upscaled linear of the base
    other = tmp_path / "other"
    shutil.copytree(f["adapters"][1], other)
    state = load_file(other / "adapter_model.safetensors")
    state = {k.replace("layers.1.mlp.down_proj", "layers.1.mlp.extra_proj"): v for k, v in state.items()}
    save_file(state, other / "adapter_model.safetensors")
    with pytest.raises(InputError, match="'model.layers.1.mlp.extra_proj' is not an upscaled linear"):
        build_plan(options, base, [open_expert(str(other)), experts[1]])
    # DoRA is not B @ A
    config["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="use_dora"):
        open_expert(str(adapter))
