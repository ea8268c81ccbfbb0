"""Budgeted ranks (--expert-rank auto --budget, --router-rank auto): the allocation checked against float64
spectra of the source weights, the model against the float64 reference with those ranks, and the other
commands (verify, export, dry run) on an output whose ranks differ per module and expert."""

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import FAITHFUL, smile, upscale_argv
from reference import reference_model
from smile_cli.inspection import rank_for_budget
from smile_cli.options import UpscaleOptions
from smile_cli.planning import load_plan
from smile_cli.ranks import CAP_FACTOR

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
BUDGET = 1.6


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, mistral_family):
    base, experts = mistral_family
    out = tmp_path_factory.mktemp("budget") / "smile"
    argv = upscale_argv(base, experts, out, "--expert-rank", "auto", "--budget", f"{BUDGET}x", "--router-rank", "auto")
    from smile_cli.cli import run

    assert run([str(a) for a in [*argv, "--svd", "exact", "--top-k", "2", *FAITHFUL, "--quiet"]]) == 0
    config = json.loads((out / "config.json").read_text())
    return base, experts, out, config


def spectra(base, experts):
    """module -> [(singular values, ||dW||^2) per expert] in float64, from the source weights."""
    w0 = load_file(f"{base}/model.safetensors")
    states = [load_file(f"{e}/model.safetensors") for e in experts]
    result = {}
    for name in w0:
        if name.endswith("_proj.weight"):
            deltas = [s[name].double() - w0[name].double() for s in states]
            result[name.removesuffix(".weight")] = [(torch.linalg.svdvals(d), float(d.square().sum())) for d in deltas]
    return result


def test_ranks_follow_energy_under_the_budget(budgeted):
    base, experts, out, config = budgeted
    ranks = config["smile_ranks"]
    plan = load_plan(UpscaleOptions(base=str(base), experts=[str(e) for e in experts], expert_rank=1))
    shapes = {lin.module: (lin.out_features, lin.in_features) for lin in plan.linears}
    assert set(ranks) == set(shapes) == set(config["smile_target_modules"])
    params = sum(t.numel() for t in load_file(out / "model.safetensors").values())
    budget = int(BUDGET * plan.base_params)
    assert params <= budget
    left = budget - params
    spectrum = spectra(base, experts)
    # router rank: median over experts of the rank holding half the energy, within 1 .. in/16
    for module, entry in ranks.items():
        wanted = statistics.median(
            int((s.square().cumsum(0) >= 0.5 * total * (1 - 1e-9)).nonzero()[0]) + 1 for s, total in spectrum[module]
        )
        assert entry["router"] == min(max(1, shapes[module][1] // 16), max(1, round(wanted)))
    routers = {m: r["router"] for m, r in ranks.items()}
    cap = CAP_FACTOR * rank_for_budget(plan, 1, budget)  # spectra are computed before the router ranks are known
    # greedy optimality: no component the budget could still pay for holds any energy
    for module, entry in ranks.items():
        cost = sum(shapes[module])
        for (s, _), k in zip(spectrum[module], entry["experts"], strict=True):
            assert 1 <= k <= min(cap, len(s))
            if k < min(cap, len(s)) and cost <= left:
                assert s[k] < 1e-6 * s[0], (module, k)
    # the allocation keeps more energy (summed shares) than the uniform rank of the same budget
    uniform = rank_for_budget(plan, max(routers.values()), budget)

    def kept(rank_of):
        return sum(
            float(s[: rank_of(m, i)].square().sum() / total)
            for m, per_expert in spectrum.items()
            for i, (s, total) in enumerate(per_expert)
        )

    assert kept(lambda m, i: ranks[m]["experts"][i]) > kept(lambda m, i: uniform)
    assert len({k for r in ranks.values() for k in r["experts"]}) > 1  # ranks really differ


def test_budgeted_model_matches_float64_reference(budgeted):
    base, experts, out, config = budgeted
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ranks = {m: (r["router"], r["experts"]) for m, r in config["smile_ranks"].items()}
    reference = reference_model(base, experts, None, None, 2, ranks=ranks)
    with torch.no_grad():
        got, want = model(IDS).logits.double(), reference(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert list(layer.expert_ranks) == config["smile_ranks"]["model.layers.1.mlp.down_proj"]["experts"]


def test_verify_export_and_card_of_budgeted_model(budgeted, tmp_path, capsys):
    from peft import PeftModel

    base, _, out, config = budgeted
    assert smile(capsys, "verify", out)[0] == 0
    assert "allocated per module under the budget" in (out / "README.md").read_text()
    for expert in range(3):
        code, err = smile(capsys, "export", out, tmp_path / f"lora{expert}", "--expert", expert, "--as", "lora")
        assert code == 0, err
        adapter = json.loads((tmp_path / f"lora{expert}" / "adapter_config.json").read_text())
        ranks = {m: r["experts"][expert] for m, r in config["smile_ranks"].items()}
        assert {m: adapter["rank_pattern"].get(m, adapter["r"]) for m in ranks} == ranks
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / f"lora{expert}"
        )
        smile_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        one_hot = torch.nn.functional.one_hot(torch.tensor(expert), 3).float()
        smile_model.register_routing_hook(lambda name, w, h=one_hot: h.expand_as(w))
        with torch.no_grad():
            torch.testing.assert_close(peft_model.eval()(IDS).logits, smile_model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_tampered_ranks_fail_verify(budgeted, tmp_path, capsys):
    import shutil

    _, _, out, config = budgeted
    copy = shutil.copytree(out, tmp_path / "copy")
    module = next(iter(config["smile_ranks"]))
    config["smile_ranks"][module]["experts"][0] += 1
    (copy / "config.json").write_text(json.dumps(config))
    code, err = smile(capsys, "verify", copy)
    assert code == 1 and any(f"{module}.experts_svh" in line for line in err), err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--expert-rank", "auto"], "go together"),
        (["--budget", "1.2x"], "go together"),
        (["--expert-rank", "auto", "--budget", "lots"], "ratio like 1.2x"),
        (["--expert-rank", "auto", "--budget", "1.0x"], "below the smallest SMILE model"),
    ],
)
def test_bad_budget_options_exit_2_and_write_nothing(flags, message, tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    code, err = smile(capsys, *upscale_argv(base, experts, tmp_path / "out", *flags))
    assert code == 2 and message in "\n".join(err), err
    assert not list(tmp_path.iterdir())


def test_dry_run_shows_allocated_ranks(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    argv = upscale_argv(base, experts, tmp_path / "out", "--expert-rank", "auto", "--budget", "2x", "--dry-run")
    capsys.readouterr()
    from smile_cli.cli import run

    assert run([str(a) for a in [*argv, "--json"]]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["ranks_by_kind"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip
    assert summary["params_ratio"] <= 2
    assert not (tmp_path / "out").exists()


def test_parts_and_resume_use_the_same_allocation(tmp_path, capsys, mistral_family, monkeypatch):
    """--shard parts each allocate (deterministically) and record the ranks; assemble uses the recorded ranks
    (it does not allocate again) and the result is the single run's, byte for byte."""
    import smile_cli.planning
    from helpers import folder_hashes

    base, experts = mistral_family
    flags = ("--expert-rank", "auto", "--budget", "1.6x", "--router-rank", "auto", "--max-shard-size", "20KB")
    single, parts = tmp_path / "single", tmp_path / "parts"
    assert smile(capsys, *upscale_argv(base, experts, single, *flags, "--quiet"))[0] == 0
    assert len(list(single.glob("model-*.safetensors"))) > 2
    for i in range(2):
        assert smile(capsys, *upscale_argv(base, experts, parts, *flags, "--shard", f"{i}/2", "--quiet"))[0] == 0
    monkeypatch.setattr(smile_cli.planning, "allocate_ranks", lambda plan: pytest.fail("assemble allocated again"))
    assert smile(capsys, "assemble", parts, "--quiet")[0] == 0
    assert folder_hashes(parts) == folder_hashes(single)
