"""An expert rank above what a LoRA expert's update holds is clamped to the adapter's rank, per module: the stored
ranks go into config.json (smile_ranks), the model card and the --json summary; the model computes the same
function (float64 reference; the same upscale of the merged checkpoints, which is not clamped), with no all-zero
rows; outputs that need no clamp keep the uniform ranks (no smile_ranks)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL
from reference import reference_model
from smile_cli.cli import run
from tiny_lora import make_lora
from tiny_models import make_base, make_expert, tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama, two LoRA adapters of rank 4 (down_proj 6) and 3 (three projections only), their merged dense
    fine-tunes, and one full fine-tune."""
    root = tmp_path_factory.mktemp("clamp")
    base = make_base(root / "base", tiny_config("llama"))
    a0 = dict(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"down_proj": 6})
    a1 = dict(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])
    make_lora(base, root / "a0", seed=3, merged=root / "m0", **a0)
    make_lora(base, root / "a1", seed=4, merged=root / "m1", **a1)
    full = make_expert(base, root / "full", seed=7)
    return dict(base=base, adapters=[root / "a0", root / "a1"], merged=[root / "m0", root / "m1"], full=full)


def upscale(family, experts, out, expert_rank, *extra):
    argv = ["upscale", "--base", family["base"], "--experts", ",".join(map(str, experts)), "--out", out]
    argv += ["--svd", "exact", "--router-rank", "2", "--expert-rank", expert_rank, "--top-k", "1", *FAITHFUL, *extra]
    return run([str(a) for a in argv])


def held(module: str, expert: str) -> int:
    """The rank each expert's update holds in module (the fixture's adapters; the full fine-tune: more than 16)."""
    kind = module.rsplit(".", 1)[-1]
    if expert == "a0":
        return 6 if kind == "down_proj" else 4
    if expert == "a1":
        return 3 if kind in ("q_proj", "v_proj", "down_proj") else 0
    return 10**9


def test_rank_above_lora_rank_is_clamped_same_function(tmp_path, family, capsys):
    f = family
    experts = [f["adapters"][0], f["full"], f["adapters"][1]]
    out = tmp_path / "out"
    assert upscale(f, experts, out, 16, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ranks_clamped"] is True and summary["ranks_by_kind"]
    config = json.loads((out / "config.json").read_text())
    table = config["smile_ranks"]
    state = load_file(out / "model.safetensors")
    assert table and set(table) == set(config["smile_target_modules"])
    for module, entry in table.items():
        want = [max(1, min(16, held(module, e))) for e in ("a0", "full", "a1")]
        assert entry == {"router": 2, "experts": want}, module
        svh, u = state[module + ".experts_svh"], state[module + ".experts_u"]
        assert svh.shape[0] == u.shape[1] == sum(want)
        rows = svh.abs().amax(dim=1) > 0
        # no all-zero row, except the one row the format keeps for an update that is zero (a1's untouched modules)
        zero_rows = int((~rows).sum())
        assert zero_rows == (1 if held(module, "a1") == 0 else 0), module
    assert "clamped to the rank each expert's update holds" in (out / "README.md").read_text()
    assert json.loads((out / "smile_manifest.json").read_text())["ranks"] == table

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    merged = [f["merged"][0], f["full"], f["merged"][1]]
    reference = reference_model(f["base"], merged, 2, 16, 1, tol=1e-5)
    # the same upscale of the merged checkpoints: dense experts, whose rank is not known without an SVD, not clamped
    unclamped_dir = tmp_path / "unclamped"
    assert upscale(f, merged, unclamped_dir, 16, "--quiet") == 0
    assert "smile_ranks" not in json.loads((unclamped_dir / "config.json").read_text()) or not json.loads(
        (unclamped_dir / "config.json").read_text()
    ).get("smile_ranks")
    unclamped = AutoModelForCausalLM.from_pretrained(unclamped_dir, trust_remote_code=True).eval()
    for seed in (0, 1):
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(ids).logits
            torch.testing.assert_close(logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, unclamped(ids).logits, rtol=1e-5, atol=1e-5)
            # generate() with and without the cache, unpadded
            a = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
            b = model.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
            assert torch.equal(a, b) and torch.equal(a, unclamped.generate(ids[:1], max_new_tokens=5, do_sample=False))
    assert run(["verify", str(out)]) == 0


@pytest.mark.parametrize("expert_rank", ["3", "full"])
def test_no_clamp_needed_keeps_uniform_ranks(tmp_path, family, capsys, expert_rank):
    """At or below every adapter's rank (or dense experts), nothing is clamped: no smile_ranks, no manifest ranks."""
    f = family
    out = tmp_path / "out"
    assert upscale(f, [f["adapters"][0], f["full"]], out, expert_rank, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ranks_clamped"] is False and summary["ranks_by_kind"] is None
    assert json.loads((out / "config.json").read_text()).get("smile_ranks") is None
    assert "ranks" not in json.loads((out / "smile_manifest.json").read_text())
    assert "clamped" not in (out / "README.md").read_text()
