"""An expert rank above what an expert's update holds is clamped to it, per module: to a LoRA adapter's rank (from
its headers), and to a fine-tuned checkpoint's numerical rank as it is factorized (a LoRA merged into a full
checkpoint: its spectrum beyond r is the merge's rounding noise). The stored ranks go into config.json
(smile_ranks), the model card and the --json summary; the model computes the same function as the unclamped one
(float64 references with and without the noise directions), with no all-zero rows and fewer parameters, in a
single run as in parts; outputs that need no clamp keep the uniform ranks (no smile_ranks)."""

import json
import shutil

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
    # the same upscale of the merged checkpoints: clamped as they are factorized, to the same ranks
    merged_dir = tmp_path / "merged"
    assert upscale(f, merged, merged_dir, 16, "--quiet") == 0
    assert json.loads((merged_dir / "config.json").read_text())["smile_ranks"] == table
    from_merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    for seed in (0, 1):
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(ids).logits
            torch.testing.assert_close(logits.double(), reference(ids).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, from_merged(ids).logits, rtol=1e-5, atol=1e-5)
            # generate() with and without the cache, unpadded
            a = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
            b = model.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False)
            assert torch.equal(a, b) and torch.equal(
                a, from_merged.generate(ids[:1], max_new_tokens=5, do_sample=False)
            )
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


def clamped_table(module: str) -> dict:
    return {"router": 2, "experts": [max(1, min(16, held(module, e))) for e in ("a0", "full", "a1")]}


def test_merged_lora_checkpoints_clamped_to_their_numerical_rank(tmp_path, family, capsys):
    """Full checkpoints whose updates are rank-r products (merged LoRAs) beside a full fine-tune, at expert rank 16:
    each merged update is stored at its r (one row where it is zero), the full fine-tune at 16; the function is the
    unclamped model's within float tolerance, with fewer parameters than planned."""
    f = family
    merged = [f["merged"][0], f["full"], f["merged"][1]]
    assert upscale(f, merged, tmp_path / "plan", 16, "--dry-run", "--json") == 0
    planned = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert upscale(f, merged, out, 16, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert planned["ranks_clamped"] is False and summary["ranks_clamped"] is True and summary["ranks_by_kind"]
    config = json.loads((out / "config.json").read_text())
    table = config["smile_ranks"]
    assert table == {module: clamped_table(module) for module in config["smile_target_modules"]}
    state = load_file(out / "model.safetensors")
    assert summary["params"] == sum(t.numel() for t in state.values()) < planned["params"]
    for module, entry in table.items():
        svh, u = state[module + ".experts_svh"], state[module + ".experts_u"]
        assert svh.shape[0] == u.shape[1] == sum(entry["experts"])
        zero_rows = int((svh.abs().amax(dim=1) == 0).sum())
        assert zero_rows == (1 if held(module, "a1") == 0 else 0), module
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert "ranks" not in manifest  # the head is the planned run's (what --resume compares)
    assert {m for s in manifest["shards"] for m in s.get("ranks", {})} == {
        m for m, e in table.items() if e["experts"] != [16, 16, 16]
    }
    assert "numerical rank" in (out / "README.md").read_text()
    assert run(["verify", str(out)]) == 0

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    unclamped = reference_model(f["base"], merged, 2, 16, 1, tol=1e-12)  # keeps the noise directions
    without_noise = reference_model(f["base"], merged, 2, 16, 1, tol=1e-5)
    for seed in (0, 1):
        ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(ids).logits.double()
            torch.testing.assert_close(logits, unclamped(ids).logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, without_noise(ids).logits, rtol=1e-4, atol=1e-4)
            a = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
            assert torch.equal(a, model.generate(ids[:1], max_new_tokens=5, do_sample=False, use_cache=False))

    # --resume of the complete output: nothing to do, the same summary
    capsys.readouterr()
    assert upscale(f, merged, out, 16, "--resume", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["params"], again["ranks_by_kind"], again["ranks_clamped"]) == (
        summary["params"],
        summary["ranks_by_kind"],
        True,
    )


def test_merged_clamp_in_parts_is_the_single_run(tmp_path, family):
    """Many small shards (headers rewritten with the shapes written), written by two parts and assembled: every
    file identical to the single run's; the single run's shards load and match its index."""
    f = family
    merged = [f["merged"][0], f["full"], f["merged"][1]]
    single, parts = tmp_path / "single", tmp_path / "parts"
    assert upscale(f, merged, single, 16, "--max-shard-size", "8KB", "--quiet") == 0
    for part in ("0/2", "1/2"):
        assert upscale(f, merged, parts, 16, "--max-shard-size", "8KB", "--shard", part, "--quiet") == 0
    assert run(["assemble", str(parts), "--quiet"]) == 0
    names = sorted(p.name for p in single.iterdir())
    assert (
        names == sorted(p.name for p in parts.iterdir()) and len([n for n in names if n.endswith(".safetensors")]) > 4
    )
    for name in names:
        if name != "README.md":  # the card names the command
            assert (single / name).read_bytes() == (parts / name).read_bytes(), name
    index = json.loads((single / "model.safetensors.index.json").read_text())
    sizes = 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(single / shard)
        assert all(index["weight_map"][n] == shard for n in tensors)
        sizes += sum(t.numel() * t.element_size() for t in tensors.values())
    assert sizes == index["metadata"]["total_size"]
    config = json.loads((single / "config.json").read_text())
    assert config["smile_ranks"] == {m: clamped_table(m) for m in config["smile_target_modules"]}
    shutil.rmtree(parts)
    assert run(["verify", str(single)]) == 0
