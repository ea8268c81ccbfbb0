"""smile inspect: energies and overlaps against float64 numbers computed here, JSON schema, warnings, budget, plots."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import smile
from smile_cli.inspection import rank_for_budget
from smile_cli.options import UpscaleOptions
from smile_cli.planning import load_plan
from tiny_lora import make_lora


def inspect_json(capsys, base, experts, *extra):
    capsys.readouterr()
    code, _ = smile(capsys, "inspect", base, "--experts", ",".join(map(str, experts)), "--svd", "exact", *extra)
    assert code == 0
    return code


def run_json(capsys, base, experts, *extra):
    from smile_cli.cli import run

    capsys.readouterr()
    argv = ["inspect", str(base), "--experts", ",".join(map(str, experts)), "--svd", "exact", "--json", *extra]
    code = run([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), captured.err


def test_energy_and_overlap_match_float64(capsys, mistral_family):
    base, experts = mistral_family
    report, _ = run_json(capsys, base, experts, "--router-rank", "2", "--expert-rank", "3", "--spectrum-rank", "4")
    assert {"base", "experts", "layers", "kinds", "params", "budget", "warnings", "router_rank"} <= set(report)
    w0 = load_file(f"{base}/model.safetensors")
    states = [load_file(f"{e}/model.safetensors") for e in experts]
    for layer in report["layers"][:4] + report["layers"][-3:]:
        name = layer["module"] + ".weight"
        svds = [torch.linalg.svd(s[name].double() - w0[name].double(), full_matrices=False) for s in states]
        assert layer["shape"] == list(w0[name].shape)
        for (_, s, _), record in zip(svds, layer["experts"], strict=True):
            total = s.square().sum()
            assert record["energy_total"] == pytest.approx(float(total), rel=1e-5)
            assert record["energy_router"] == pytest.approx(float(s[:2].square().sum() / total), rel=1e-5)
            assert record["energy_expert"] == pytest.approx(float(s[:3].square().sum() / total), rel=1e-5)
            cumulative = (s.square().cumsum(0) / total).tolist()
            want_90 = next((n + 1 for n, c in enumerate(cumulative) if c >= 0.9), None)
            assert record["rank_90"] == (want_90 if want_90 is not None and want_90 <= 4 else None)
            assert len(record["singular_values"]) == 4
            if min(layer["shape"]) > 4:
                assert record["effective_rank"] is None  # the spectrum was not computed whole
        for i in range(3):
            for j in range(3):
                vi, vj = svds[i][2][:2], svds[j][2][:2]
                want = float((vi @ vj.T).square().sum() / 2)
                assert layer["overlap"][i][j] == pytest.approx(want, abs=1e-5)
    assert report["params"]["base"] < report["params"]["smile"]


def test_effective_rank_with_whole_spectrum_and_lora_experts(tmp_path, capsys, mistral_family):
    base, experts = mistral_family
    adapter = tmp_path / "adapter"
    make_lora(base, adapter, seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    report, _ = run_json(
        capsys, base, [experts[0], adapter], "--router-rank", "2", "--expert-rank", "2", "--spectrum-rank", "48"
    )
    layer = next(layer for layer in report["layers"] if layer["module"] == "model.layers.0.self_attn.q_proj")
    w0 = load_file(f"{base}/model.safetensors")[layer["module"] + ".weight"].double()
    delta = load_file(f"{experts[0]}/model.safetensors")[layer["module"] + ".weight"].double() - w0
    p = torch.linalg.svdvals(delta).square()
    p = p / p.sum()
    assert layer["experts"][0]["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    lora = layer["experts"][1]
    assert lora["energy_expert"] == pytest.approx(1.0) and lora["rank_90"] <= 2  # a rank-2 update, kept whole
    assert lora["effective_rank"] is not None
    untouched = next(la for la in report["layers"] if la["module"] == "model.layers.0.mlp.up_proj")
    assert untouched["experts"][1]["zero"] and untouched["overlap"][0][1] is None


def test_collapse_warning_and_budget(capsys, mistral_family):
    base, experts = mistral_family
    report, err = run_json(capsys, base, experts, "--router-rank", "16", "--expert-rank", "2", "--budget", "2.5x")
    assert any("close to the input width" in w for w in report["warnings"])  # 16 of 32 inputs
    assert "close to the input width" in err
    options = UpscaleOptions(base=str(base), experts=[str(e) for e in experts], router_rank=16, expert_rank=2)
    plan = load_plan(options)
    k = report["budget"]["expert_rank"]
    allowed = report["budget"]["params"]
    assert allowed == int(2.5 * plan.base_params)

    def params(rank):  # the planned output's parameter count at that rank
        return load_plan(options.model_copy(update={"expert_rank": rank})).out_params

    assert k is not None and params(k) <= allowed and (k == 16 or params(k + 1) > allowed)
    assert report["budget"]["model_params"] == params(k)
    assert report["params"]["smile"] == plan.out_params
    assert rank_for_budget(plan, 16, plan.base_params) is None  # nothing fits in the base's own size


def test_tables_and_plots(tmp_path, capsys, mistral_family):
    pytest.importorskip("matplotlib")
    base, experts = mistral_family
    report, _ = run_json(capsys, base, experts, "--router-rank", "2", "--expert-rank", "4", "--plot", tmp_path / "figs")
    assert sorted(p.rsplit("/", 1)[-1] for p in report["plots"]) == ["energy.png", "overlap.png", "spectrum.png"]
    for name in ("energy.png", "overlap.png", "spectrum.png"):
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inspect_json(capsys, base, experts, "--router-rank", "2", "--expert-rank", "4", "--budget", "1.5x")


def test_budget_report_shows_the_ranks_upscale_allocates(capsys, mistral_family, tmp_path):
    from helpers import smile, upscale_argv

    base, experts = mistral_family
    report, err = run_json(capsys, base, experts, "--router-rank", "2", "--expert-rank", "4", "--budget", "1.8x")
    out = tmp_path / "auto"
    flags = ("--router-rank", "2", "--expert-rank", "auto", "--budget", "1.8x", "--svd", "exact", "--quiet")
    assert smile(capsys, *upscale_argv(base, experts, out, *flags))[0] == 0
    config = json.loads((out / "config.json").read_text())
    for layer in report["layers"]:
        assert [e["rank_allocated"] for e in layer["experts"]] == config["smile_ranks"][layer["module"]]["experts"]
    params = sum(t.numel() for t in load_file(out / "model.safetensors").values())
    assert report["budget"]["allocated"]["model_params"] == params <= report["budget"]["params"]
    text = inspect_text(capsys, base, experts, "--router-rank", "2", "--expert-rank", "4", "--budget", "1.8x")
    assert "ranks allocated (auto)" in text


def inspect_text(capsys, base, experts, *extra):
    from smile_cli.cli import run

    capsys.readouterr()
    assert run([str(a) for a in ["inspect", base, "--experts", ",".join(map(str, experts)), *extra]]) == 0
    return capsys.readouterr().out
