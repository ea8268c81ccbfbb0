"""`smile route`: the JSON report, the table, the heatmap, T5 and CLIP vision outputs (images), bad inputs, and
routing on the demo's trained tiny task models."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoImageProcessor, CLIPVisionModel

from helpers import copy_model, upscaled
from reference import ReferenceSmileLinear, reference_model
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


@pytest.fixture(scope="module")
def clip_output(tmp_path_factory):
    """(base, experts, output) of the tiny CLIP vision family: 16x16 images in 8x8 patches, the paper's per-token
    router with top-2 (weights below 1 say something) and exact SVD, as the float64 reference computes it."""
    root = tmp_path_factory.mktemp("clip")
    base, experts = make_family(root, "clip_vision")
    options = ("--svd", "exact", "--router-rank", "2", "--expert-rank", "4", "--top-k", "2", "--routing", "faithful")
    return base, experts, upscaled(base, experts, root / "out", *options, "--quiet")


def write_images(folder) -> list:
    """Two PNGs written by Pillow, neither 16x16 (the image processor resizes and crops): RGB and greyscale noise."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(24, 20, 3, generator=generator) * 255).to(torch.uint8).numpy()
    paths = [folder / "a.png", folder / "b.png"]
    Image.fromarray(pixels).save(paths[0])
    Image.fromarray(pixels).convert("L").resize((40, 30)).save(paths[1])
    return paths


def reference_routing_of(reference, pixel_values) -> dict:
    """The float64 reference model's routing weights (positions, experts) per upscaled module for one image."""
    captured = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: captured.__setitem__(name, m.routing(args[0])))
        for name, module in reference.named_modules()
        if isinstance(module, ReferenceSmileLinear)
    ]
    try:
        with torch.no_grad():
            reference(pixel_values=pixel_values.double())
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_clip_vision_output_routes_every_patch_of_each_image(clip_output, tmp_path):
    """`smile route OUT --image FILE` on a CLIP vision output: each image preprocessed by the base's image processor
    (copied into the output), then per upscaled layer the chosen expert and its weight for CLS and every patch,
    as the float64 reference's routers decide on the same pixels."""
    from PIL import Image

    base, experts, out = clip_output
    paths = write_images(tmp_path)
    result = route_subprocess(out, "--image", paths[0], "--image", paths[1], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["experts"] == ["expert0", "expert1", "expert2"] and "prompts" not in report
    assert [record["image"] for record in report["images"]] == [str(p) for p in paths]
    config = json.loads((out / "config.json").read_text())
    patches = (config["image_size"] // config["patch_size"]) ** 2
    targets = config["smile_target_modules"]
    reference = reference_model(base, experts, 2, 4, 2, targets=targets, model_class=CLIPVisionModel)
    processor = AutoImageProcessor.from_pretrained(out)
    chosen = set()
    for path, record in zip(paths, report["images"], strict=True):
        assert record["tokens"] == ["CLS"] + [f"patch{i}" for i in range(patches)]
        assert sorted(entry["module"] for entry in record["layers"]) == sorted(targets)
        with Image.open(path) as image:
            pixel_values = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        want = reference_routing_of(reference, pixel_values)
        for entry in record["layers"]:
            top_weight, top_expert = want[entry["module"]].max(dim=-1)
            assert len(entry["expert"]) == patches + 1
            assert entry["expert"] == top_expert.tolist(), entry["module"]
            assert entry["weight"] == pytest.approx(top_weight.tolist(), abs=2e-4), entry["module"]
            chosen.update(entry["expert"])
        assert [row["layer"] for row in record["summary"]] == ["0", "1"]  # encoder.layers.0 and encoder.layers.1
        for row in record["summary"]:
            decisions = [
                e
                for entry in record["layers"]
                if f".layers.{row['layer']}." in entry["module"]
                for e in entry["expert"]
            ]
            assert row["share"] == pytest.approx([decisions.count(i) / len(decisions) for i in range(3)], abs=1e-4)
    assert len(chosen) > 1  # the routers tell the positions apart


def test_clip_vision_table_and_heatmap(clip_output, tmp_path, capsys):
    _, _, out = clip_output
    png = tmp_path / "routing.png"
    paths = write_images(tmp_path)
    assert run(["route", str(out), "--image", str(paths[1]), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "b.png" in table and "expert2" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_vision_output_given_a_prompt_is_refused_in_one_line(clip_output):
    """A model that reads pixel_values, given text: one line on stderr, exit 2, nothing on stdout."""
    _, _, out = clip_output
    result = route_subprocess(out, "--prompt", "abc:", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: this model reads images (pixel_values), not text: route it with --image FILE"
    ]


def test_image_errors(clip_output, routed_model, tmp_path, capsys, monkeypatch):
    """Each bad image input: one line on stderr, exit 2, nothing on stdout."""
    _, _, out = clip_output
    png = write_images(tmp_path)[0]

    def refused(*argv) -> str:
        capsys.readouterr()
        code = run(["route", *map(str, argv)])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", (code, captured)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert refused(routed_model, "--image", png) == (
        f"error: {routed_model}: this model reads text (input_ids), not images: route it with --prompt TEXT"
    )
    assert refused(out) == "error: no image given (--image FILE)"
    assert "not both" in refused(out, "--prompt", "abc", "--image", png)
    missing = tmp_path / "missing.png"
    assert refused(out, "--image", missing) == f"error: {missing}: cannot read the image: No such file or directory"
    assert refused(out, "--image", tmp_path) == f"error: {tmp_path}: cannot read the image: Is a directory"
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    assert refused(out, "--image", text) == f"error: {text}: not an image file Pillow can read"
    bare = copy_model(out, tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()
    assert refused(bare, "--image", png).startswith(f"error: {bare}: no preprocessor_config.json")
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    assert refused(out, "--image", png) == "error: --image needs Pillow: pip install pillow"


# Share of (token, projection) routing decisions that go to the prompt's own task expert, on the trained demo
# models (router rank 8, expert rank 16), measured with `smile route` on 10 validation prompts per task on
# 2026-11-30: faithful per-token routing 0.46 reverse, 0.43 sort, 0.31 mirror, 0.50 extract (mean 0.43; chance
# is 0.25); prompt-model routing 1.0, 1.0, 1.0, 0.57 (extract's prompts mix letters and digits, the alphabets of
# reverse and mirror). Re-measured on 2026-12-07 on demo models retrained from a cold cache on another machine
# (same code and seeds; the trained weights depend on the CPU's float kernels: the first 30 pre-training steps
# give identical weights under transformers 5.24 and 5.25 here, so the library is not the cause; the routing code
# of 2026-11-30 gives the same shares on them): faithful 0.15, 0.38, 0.09, 0.70 (mean 0.33). Faithful routing
# is weak on these tiny models (docs/results/routing.md), so it is held to above chance on average only;
# prompt-model to most tokens on average and over half on every task.
MEAN_SHARE = {"faithful": 0.30, "prompt-model": 0.85}
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
