"""`smile route`: the JSON report, the table, the heatmap, and routing on the demo's trained tiny task models."""

import json
import subprocess
import sys

import pytest

from helpers import upscaled
from smile_cli.cli import run
from tiny_experts import models, tasks
from tiny_models import make_family


@pytest.fixture(scope="module")
def routed_model(tmp_path_factory, char_family):
    out = tmp_path_factory.mktemp("route") / "out"
    return upscaled(*char_family, out, "--router-rank", "2", "--expert-rank", "4", "--quiet")


def test_json_report_schema(routed_model, capsys):
    assert run(["route", str(routed_model), "--prompt", "abc:", "--prompt", "x=1;x?", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["experts"] == ["expert0", "expert1", "expert2"]
    assert [p["prompt"] for p in report["prompts"]] == ["abc:", "x=1;x?"]
    first = report["prompts"][0]
    assert first["tokens"] == ["<s>", "a", "b", "c", ":"]
    assert len(first["layers"]) == 14  # 7 projections x 2 layers
    for entry in first["layers"]:
        assert len(entry["expert"]) == len(entry["weight"]) == 5
        assert all(0 <= e < 3 for e in entry["expert"]) and all(0 < w <= 1 for w in entry["weight"])
    for row in first["summary"]:
        assert sum(row["share"]) == pytest.approx(1, abs=1e-3)
    assert [row["layer"] for row in first["summary"]] == ["0", "1"]


def test_table_and_heatmap(routed_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abc:\n\nQWE>\n")
    png = tmp_path / "routing.png"
    assert run(["route", str(routed_model), "--prompts-file", str(prompts), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "abc:" in out and "QWE>" in out and "expert2" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_route_errors(tmp_path, routed_model, capsys):
    assert run(["route", str(tmp_path), "--prompt", "x"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert run(["route", str(routed_model)]) == 2
    assert "no prompt" in capsys.readouterr().err


def route_subprocess(model_dir, *argv) -> subprocess.CompletedProcess:
    """`python -m smile_cli route MODEL_DIR ARGV...` as users run it."""
    command = [sys.executable, "-m", "smile_cli", "route", str(model_dir), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_t5_output_routes_its_encoder_layers(tmp_path):
    """An encoder-decoder output loads through its own Auto class (AutoModelForSeq2SeqLM) and reports, per prompt,
    the routing of every upscaled encoder layer for each of the prompt's tokens (the decoder routes its own step)."""
    base, experts = make_family(tmp_path, "t5")
    models.save_char_tokenizer(base)
    out = upscaled(base, experts, tmp_path / "out", "--router-rank", "2", "--expert-rank", "4", "--routing", "faithful")
    result = route_subprocess(out, "--prompt", "abc:", "--prompt", "QWE>", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experts"] == ["expert0", "expert1", "expert2"]
    assert [p["tokens"] for p in report["prompts"]] == [["<s>", "a", "b", "c", ":"], ["<s>", "Q", "W", "E", ">"]]
    targets = json.loads((out / "config.json").read_text())["smile_target_modules"]
    encoder = {t for t in targets if t.startswith("encoder.")}
    assert encoder and len(encoder) < len(targets)  # the decoder is upscaled too, and left out of the report
    for prompt in report["prompts"]:
        assert {entry["module"] for entry in prompt["layers"]} == encoder
        for entry in prompt["layers"]:
            assert len(entry["expert"]) == len(entry["weight"]) == 5
            assert all(0 <= e < 3 for e in entry["expert"]) and all(0 < w <= 1 for w in entry["weight"])
        assert [row["layer"] for row in prompt["summary"]] == ["0", "1"]  # encoder.block.0 and encoder.block.1
        for row in prompt["summary"]:
            assert sum(row["share"]) == pytest.approx(1, abs=1e-3)


def test_clip_vision_output_is_refused_in_one_line(tmp_path):
    """A model that reads pixel_values, not token ids: one line on stderr, exit 2, nothing on stdout."""
    base, experts = make_family(tmp_path, "clip_vision")
    out = upscaled(base, experts, tmp_path / "out", "--router-rank", "2", "--expert-rank", "4", "--routing", "faithful")
    result = route_subprocess(out, "--prompt", "abc:", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: smile route reads text prompts; this model takes pixel_values"
    ]


# Share of (token, projection) routing decisions that go to the prompt's own task expert, on the trained demo
# models (router rank 8, expert rank 16), measured with `smile route` on 10 validation prompts per task on
# 2026-11-30: faithful per-token routing 0.46 reverse, 0.43 sort, 0.31 mirror, 0.50 extract (mean 0.43; chance
# is 0.25); prompt-model routing 1.0, 1.0, 1.0, 0.57 (extract's prompts mix letters and digits, the alphabets of
# reverse and mirror). Faithful routing is weak on these tiny models (docs/results/routing.md), so it
# is held to its measured mean only; prompt-model to most tokens on average and over half on every task.
MEAN_SHARE = {"faithful": 0.40, "prompt-model": 0.85}
MIN_SHARE = {"faithful": 0.0, "prompt-model": 0.50}


@pytest.mark.slow
@pytest.mark.parametrize("routing", sorted(MEAN_SHARE))
def test_trained_experts_get_their_tasks_tokens(demo_models, tmp_path, routing, capsys):
    experts = [demo_models["experts"][t] for t in demo_models["tasks"]]
    out = tmp_path / "smile"
    upscaled(demo_models["base"], experts, out, "--router-rank", "8", "--expert-rank", "16", "--routing", routing, "-q")
    capsys.readouterr()
    val, _ = tasks.eval_splits(demo_models["tasks"], 10, 0)
    shares = {}
    for index, task in enumerate(demo_models["tasks"]):
        argv = ["route", str(out), "--json"] + [a for prompt, _ in val[task][:10] for a in ("--prompt", prompt)]
        assert run(argv) == 0
        report = json.loads(capsys.readouterr().out)
        decisions = [e for p in report["prompts"] for layer in p["layers"] for e in layer["expert"][1:]]  # no BOS
        shares[task] = decisions.count(index) / len(decisions)
    assert min(shares.values()) >= MIN_SHARE[routing], shares
    assert sum(shares.values()) / len(shares) >= MEAN_SHARE[routing], shares
