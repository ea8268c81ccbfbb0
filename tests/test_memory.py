"""Memory behaviour of the commands that read a model's weights (issue 14): verify checks each SmileLinear on its own
and loads the whole model only within its budget, in the stored dtype; route refuses up front when the model will
not fit; the available-memory figure comes from the environment override, MemAvailable or the cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from helpers import edit_tensors, upscale
from reference import smile_reference
from smile_cli import memory
from smile_cli.cli import run
from smile_cli.plan import LinearRanks
from smile_cli.verify import smile_formula

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bf16_output(tmp_path_factory, mistral_family):
    """A SMILE folder stored in bfloat16 (top-2 routing, so routing weights matter), one shard."""
    base, experts = mistral_family
    out = tmp_path_factory.mktemp("memory") / "out"
    assert (
        upscale(
            base,
            experts,
            out,
            "--router-rank",
            "2",
            "--expert-rank",
            "4",
            "--top-k",
            "2",
            "--dtype",
            "bfloat16",
            "--quiet",
        )
        == 0
    )
    return out


@pytest.fixture
def built_models(monkeypatch):
    """Every transformers model instantiated while the test runs: (class name, default dtype at construction)."""
    built = []
    original = transformers.PreTrainedModel.__init__

    def record(self, *args, **kwargs):
        built.append((type(self).__name__, torch.get_default_dtype()))
        original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", record)
    return built


def _verify_json(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = run(["verify", *map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_verify_over_budget_checks_each_layer_and_never_builds_the_model(bf16_output, built_models, capsys):
    code, report = _verify_json(capsys, bf16_output, "--max-memory", "1KB")
    assert code == 0 and report["ok"], report
    assert built_models == []  # no model object at all, let alone a float32 one
    assert "layer forward passes" in report["checks"] and "forward pass" not in report["checks"]
    assert "14 SmileLinear modules" in report["how"]["layer forward passes"]
    assert "float64" in report["how"]["layer forward passes"]
    skipped = [s for s in report["skipped"] if s.startswith("forward pass:")]
    assert len(skipped) == 1 and "over --max-memory" in skipped[0], report["skipped"]
    assert report["memory"]["budget_bytes"] == 1000
    assert report["memory"]["whole_model_bytes"] > 1000
    # the human output says what was checked how, and what was skipped
    assert run(["verify", str(bf16_output), "--max-memory", "1KB"]) == 0
    out = capsys.readouterr().out
    assert "checked layer forward passes: each of the 14 SmileLinear" in out
    assert "skipped forward pass: loading the whole model needs about" in out


def test_verify_within_budget_loads_the_model_in_its_stored_dtype(bf16_output, built_models, monkeypatch, capsys):
    loaded = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        loaded.append({p.dtype for n, p in model.named_parameters() if ".router." not in n})
        return result

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    code, report = _verify_json(capsys, bf16_output)
    assert code == 0 and "forward pass" in report["checks"], report
    assert "bfloat16" in report["how"]["forward pass"]
    assert loaded and all(dtypes == {torch.bfloat16} for dtypes in loaded)
    assert built_models and {dtype for _, dtype in built_models} == {torch.bfloat16}  # built in bf16, not float32


def test_layer_check_catches_a_forward_that_departs_from_the_formula(bf16_output, monkeypatch, capsys):
    from smile_cli.modeling.modeling_smile import SmileLinear

    original = SmileLinear.forward
    monkeypatch.setattr(SmileLinear, "forward", lambda self, x: original(self, x) * 1.001)
    code, report = _verify_json(capsys, bf16_output, "--max-memory", "1KB")
    assert code == 1 and not report["ok"]
    assert any("forward pass differs from the SMILE formula" in d for d in report["defects"]), report["defects"]


def test_nan_in_a_tensor_is_a_defect_even_without_forward_passes(bf16_output, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(bf16_output, tmp_path / "nan")
    name = "model.layers.1.self_attn.v_proj.experts_u"
    edit_tensors(folder, lambda state: state[name].view(-1)[3:5].fill_(float("nan")))
    code, report = _verify_json(capsys, folder, "--no-load")
    assert code == 1
    assert f"tensor '{name}' holds 2 NaN or Inf values" in report["defects"], report["defects"]


def test_formula_agrees_with_the_independent_reference(mistral_family, tmp_path):
    """verify's formula reads the stored layout as the SMILE method defines it: on exact factors it gives the
    float64 reference computed from the source weights."""
    base, experts = mistral_family
    out = tmp_path / "exact"
    assert (
        upscale(
            base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--top-k", "2", "--svd", "exact", "--quiet"
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    module = "model.layers.0.mlp.up_proj"
    with safe_open(out / "model.safetensors", "pt") as f:
        params = {k.removeprefix(module + "."): f.get_tensor(k) for k in f.keys() if k.startswith(module + ".")}
    sources = []
    for folder in [base, *experts]:
        with safe_open(folder / "model.safetensors", "pt") as f:
            sources.append(f.get_tensor(module + ".weight"))
    x = torch.randn(16, sources[0].shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ranks = LinearRanks.of_config(config, module)
    y, kept = smile_formula(x, params, 3, 2, ranks)
    expected, _ = smile_reference(x, sources[0], None, sources[1:], None, 2, 4, 2)
    assert kept.sum() >= 12
    error = (y[kept] - expected[kept]).abs().max() / expected.abs().max()
    assert error < 1e-5, error


def test_route_refuses_a_model_that_does_not_fit_with_one_line(bf16_output):
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMILE_AVAILABLE_MEMORY="50MB")
    result = subprocess.run(
        [sys.executable, "-m", "smile_cli", "route", str(bf16_output), "--prompt", "abc"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == ""
    assert len(lines) == 1, lines
    assert "needs about" in lines[0] and "0.05 GB is available (SMILE_AVAILABLE_MEMORY)" in lines[0], lines[0]


def test_route_loads_the_stored_dtype(tmp_path_factory, char_family, monkeypatch):
    base, experts = char_family
    out = tmp_path_factory.mktemp("route-dtype") / "out"
    assert (
        upscale(base, experts, out, "--router-rank", "2", "--expert-rank", "4", "--dtype", "bfloat16", "--quiet") == 0
    )
    from smile_cli.route import load_model

    model, _ = load_model(out)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".router." not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if ".router." in n} == {torch.float32}  # routers stay float32
    monkeypatch.setenv("SMILE_AVAILABLE_MEMORY", "1MB")
    assert run(["route", str(out), "--prompt", "abc"]) == 2


def test_available_memory_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("SMILE_AVAILABLE_MEMORY", "3GiB")
    assert memory.available_memory() == (3 * 2**30, "SMILE_AVAILABLE_MEMORY")
    monkeypatch.setenv("SMILE_AVAILABLE_MEMORY", "lots")
    with pytest.raises(memory.InputError, match="SMILE_AVAILABLE_MEMORY"):
        memory.available_memory()
    monkeypatch.delenv("SMILE_AVAILABLE_MEMORY")
    available, source = memory.available_memory()
    assert 0 < available < 2**50 and source
    # a cgroup v2 limit: limit - usage + reclaimable file cache
    (tmp_path / "memory.max").write_text("4000000000\n")
    (tmp_path / "memory.current").write_text("3000000000\n")
    (tmp_path / "memory.stat").write_text("anon 2500000000\ninactive_file 400000000\n")
    assert memory._cgroup_available(tmp_path) == 1_400_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_available(tmp_path) is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert memory._meminfo(meminfo)["MemAvailable"] == 20000000 * 1024
