"""`smile upscale --calibrate FILE.yaml` (issue 22 item 3): routers fitted to example prompts, routing "calibrated".

Checked here: every bad file is one line, exit 2, nothing written; an output without the flag records nothing of it;
the fitted routers equal an independent float64 fit (a plain transformers base in float64, its linears' inputs
captured with hooks, one prompt at a time, ridge solved directly and leave-one-prompt-out by refitting); generation
with the calibrated routing (cache on and off, one unpadded prompt, a padded batch, beams) equals greedy decoding of
an independent float64 SMILE model routed by that reference fit; two builds are byte-identical and an interrupted
build resumes to the same bytes; the streamed forward pass holds a small part of the base in memory; vLLM serves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import folder_hashes, smile, staging_of, upscale_argv, upscaled
from smile_cli import defaults
from smile_cli.cli import run
from tiny_experts import models as tiny
from tiny_experts import tasks as T

ROOT = Path(__file__).resolve().parents[1]
RANKS = ("--router-rank", "4", "--expert-rank", "full", "--dtype", "float32")
SMALL = ("--router-rank", "2", "--expert-rank", "4")  # char_family's tiny shapes
PENALTIES = (10.0, 1.0, 0.1, 0.01, 0.001)  # the fit's, relative to the mean eigenvalue (calibrate.RIDGE_PENALTIES)


def dump(value) -> str:
    return yaml.safe_dump(value, sort_keys=False)  # keys of mixed types (refs and indices) stay as written


def write_yaml(path: Path, value) -> Path:
    path.write_text(dump(value) if not isinstance(value, str) else value)
    return path


# ---- bad inputs ------------------------------------------------------------------------------------------------


def _bad_files(experts):
    a, b, c = (str(e) for e in experts)
    three = {a: ["x1"], b: ["y1"], c: ["z1"]}
    return {
        "not yaml": "a: [b\n",
        "a list": dump(["x", "y"]),
        "empty": "",
        "unknown ref": dump({a: ["x"], b: ["y"], "/no/such/expert": ["z"]}),
        "index out of range": dump({0: ["x"], 1: ["y"], 7: ["z"]}),
        "empty list": dump({a: [], b: ["y"], c: ["z"]}),
        "too many": dump({a: [f"x{i}" for i in range(9)], b: ["y"], c: ["z"]}),
        "not a string": dump({a: [123], b: ["y"], c: ["z"]}),
        "blank prompt": dump({a: ["  "], b: ["y"], c: ["z"]}),
        "duplicate prompt": dump({a: ["same"], b: ["same"], c: ["z"]}),
        "expert twice": dump({a: ["x"], 0: ["x2"], b: ["y"], c: ["z"]}),
        "missing expert": dump({a: ["x"], b: ["y"]}),
        "chat_template not bool": dump({"prompts": three, "chat_template": "yes"}),
        "no chat template": dump({"prompts": three, "chat_template": True}),
        "unknown key": dump({"prompts": three, "template": True}),
    }


@pytest.mark.parametrize("case", list(_bad_files(["a", "b", "c"])))
def test_bad_calibration_file_is_one_line_exit_2_nothing_written(tmp_path, capsys, char_family, case):
    base, experts = char_family
    calibration = write_yaml(tmp_path / "calibration.yaml", _bad_files(experts)[case])
    out = tmp_path / "out"
    for extra in (("--dry-run",), ("--out", out)):
        argv = ["upscale", "--base", base, "--experts", ",".join(map(str, experts)), *SMALL, *extra]
        code, err = smile(capsys, *argv, "--calibrate", calibration, "--quiet")
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --calibrate"), (case, err)
    assert not out.exists() and not staging_of(out).exists()


def test_other_bad_uses_of_the_flag(tmp_path, capsys, char_family):
    base, experts = char_family
    out = tmp_path / "out"
    cases = {
        "missing file": (experts, ("--calibrate", tmp_path / "nope.yaml")),
        "calibrated without file": (experts, ("--routing", "calibrated")),
        "one expert": (experts[:1], ("--calibrate", write_yaml(tmp_path / "one.yaml", {0: ["x"]}))),
    }
    for case, (chosen, extra) in cases.items():
        code, err = smile(capsys, *upscale_argv(base, chosen, out, *SMALL, *extra, "--quiet"))
        assert code == 2 and len(err) == 1, (case, err)
        assert not out.exists() and not staging_of(out).exists(), case


def test_output_without_the_flag_records_nothing_of_it(tmp_path, char_family):
    base, experts = char_family
    out = upscaled(base, experts, tmp_path / "out", *SMALL, "--quiet")
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert "smile_calibrated_routers" not in config and config["smile_routing"] == defaults.CAUSAL_LM_ROUTING
    assert "calibrate" not in manifest["options"] and "calibration" not in manifest
    assert "calibrate" not in yaml.safe_load((out / "smile_config.yaml").read_text())
    assert "calibrat" not in (out / "README.md").read_text().lower()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("calibrated" in name for name in f.keys())


def test_calibrated_merged_lora_experts_are_stored_at_their_rank(tmp_path, char_family):
    """--calibrate with fine-tunes whose update is a merged rank-2 LoRA and --expert-rank 4: their factors are
    stored at rank 2 (clamped as they are factorized) beside the calibrated routers; before, laying out the written
    plan dropped the calibrated routers and the run ended in an unexpected failure (exit 1)."""
    from tiny_lora import make_lora

    base, _ = char_family
    lora = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    merged = [tmp_path / f"merged{i}" for i in range(2)]
    for i, folder in enumerate(merged):
        make_lora(base, tmp_path / f"adapter{i}", seed=3 + i, merged=folder, **lora)
    calibration = write_yaml(tmp_path / "calibration.yaml", {0: ["abc def", "abc abc"], 1: ["xyz uvw", "zzz yyy"]})
    out = upscaled(base, merged, tmp_path / "out", *SMALL, "--calibrate", calibration, "--quiet")
    config = json.loads((out / "config.json").read_text())
    assert config["smile_calibrated_routers"] and config["smile_routing"] == "calibrated"
    module = "model.layers.0.self_attn.q_proj"
    assert config["smile_ranks"][module] == {"router": 2, "experts": [2, 2]}
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice(f"{module}.experts_svh").get_shape()[0] == 4
        assert f.get_slice(f"{module}.router.calibrated_weight").get_shape()[0] == 2
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()


# ---- the fit against an independent float64 one ---------------------------------------------------------------


def demo_calibration(tmp_path, models, per_expert=8) -> tuple[Path, list[list[str]]]:
    """per_expert held-out validation prompts of each demo task (never trained on, and not the test prompts)."""
    validation, _ = tiny.held_out(models["tasks"])
    prompts = [[p for p, _ in validation[t][:per_expert]] for t in models["tasks"]]
    experts = [str(models["experts"][t]) for t in models["tasks"]]
    mapping = {experts[0]: prompts[0], **{i: prompts[i] for i in range(1, len(experts))}}  # a ref and indices
    return write_yaml(tmp_path / "calibration.yaml", mapping), prompts


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, demo_models):
    root = tmp_path_factory.mktemp("calibrated")
    calibration, prompts = demo_calibration(root, demo_models)
    experts = [demo_models["experts"][t] for t in demo_models["tasks"]]
    argv = upscale_argv(demo_models["base"], experts, root / "out", *RANKS, "--calibrate", calibration, "--json")
    return {"argv": [str(a) for a in argv], "root": root, "experts": experts, "prompts": prompts}


@pytest.fixture(scope="module")
def built(calibrated):
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run(calibrated["argv"]) == 0
    return {**calibrated, "out": calibrated["root"] / "out", "summary": json.loads(stdout.getvalue())}


class DenseSmileReference(nn.Module):
    """A float64 SMILE linear with dense experts (y = W0 x + dW_i x), each token routed by route(x) -> expert index."""

    def __init__(self, w0, expert_weights, route):
        super().__init__()
        self.w0, self.deltas = w0.double(), [e.double() - w0.double() for e in expert_weights]
        self.route, self.weight = route, self.w0

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).double()
        chosen = self.route(flat)
        y = flat @ self.w0.T
        for i, delta in enumerate(self.deltas):
            y = y + (chosen == i).double()[:, None] * (flat @ delta.T)
        return y.reshape(*x.shape[:-1], -1)


def dense_reference(base, experts, targets, route_of):
    """The base in float64 with every target linear a DenseSmileReference routed by route_of(name)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    states = [load_file(str(Path(e) / "model.safetensors")) for e in experts]
    for name in targets:
        w0 = model.get_submodule(name).weight.detach()
        parent, _, child = name.rpartition(".")
        ref = DenseSmileReference(w0, [s[name + ".weight"] for s in states], route_of(name))
        setattr(model.get_submodule(parent), child, ref)
    return model


def reference_features(base, experts, prompts, targets) -> dict[str, list[torch.Tensor]]:
    """Per target linear, its float64 inputs for each prompt alone (BOS + characters, no padding) in an independent
    float64 SMILE model (dense experts) with each expert in turn forced on every token: rows forced * P + prompt."""
    current = [0]
    model = dense_reference(base, experts, targets, lambda name: lambda x: torch.full((len(x),), current[0]))
    seen: dict[str, list] = {name: [] for name in targets}
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0][0].detach()))
        for name, module in model.named_modules()
        if name in seen
    ]
    with torch.no_grad():
        for forced in range(len(prompts)):  # every prompt once with each expert forced on all its tokens
            current[0] = forced
            for prompt in (p for texts in prompts for p in texts):
                model(input_ids=torch.tensor([[T.BOS, *T.encode(prompt)]]))
    for handle in handles:
        handle.remove()
    return seen


def reference_fit(features: list[torch.Tensor], labels: list[int], num_experts: int, skip: int):
    """The fit written from its definition, by brute force: rows r = forced expert * P + prompt, every prompt's
    tokens after the first `skip` (all its rows) labelled with its expert and weighted 1 / (T * prompts of its expert
    * its tokens over all rows); features standardised; each candidate (centroids, ridge at each penalty) scored by
    refitting without each prompt (all its rows); the best by (prompt accuracy, token accuracy), earliest first.
    Returns (method, (W (T, in), b (T,)) on raw inputs, prompt accuracy, token accuracy)."""
    prompts = len(labels)
    xs = [f[skip:] for f in features]
    x = torch.cat(xs)
    prompt_of = torch.cat([torch.full((len(f),), r % prompts) for r, f in enumerate(xs)])
    lab = torch.tensor(labels)
    y = lab[prompt_of]
    per_expert = torch.bincount(lab, minlength=num_experts).double()
    w = 1.0 / (num_experts * per_expert[y] * torch.bincount(prompt_of)[prompt_of].double())
    mean = w @ x
    std = (w @ (x - mean) ** 2).sqrt()
    std = torch.where(std > 1e-8 * std.max(), std, torch.ones_like(std))
    z = (x - mean) / std
    target = torch.nn.functional.one_hot(y, num_experts).double() - 1.0 / num_experts
    d = z.shape[1]

    def solve_ridge(keep, penalty):
        a = z[keep] * w[keep].sqrt()[:, None]
        b = target[keep] * w[keep].sqrt()[:, None]
        return torch.linalg.solve(a.T @ a + penalty * torch.eye(d, dtype=z.dtype), a.T @ b), 1.0 / num_experts

    def solve_centroid(keep):
        kept_prompts = sorted(set(prompt_of[keep].tolist()))
        means = {p: z[prompt_of == p].mean(dim=0) for p in kept_prompts}
        cents = torch.zeros(num_experts, d, dtype=z.dtype)
        present = torch.zeros(num_experts, dtype=torch.bool)
        for c in range(num_experts):
            members = [means[p] for p in kept_prompts if labels[p] == c]
            if members:
                cents[c], present[c] = torch.stack(members).mean(dim=0), True
        return cents, present

    full = z.T @ (z * w[:, None])  # the weighted Gram's mean eigenvalue sets the penalties' scale
    evals = torch.linalg.eigvalsh(full)
    scale = evals[evals > evals.max() * 1e-12].mean()
    candidates = [("centroid", None)] + [("ridge", p) for p in PENALTIES]
    scored = []
    for method, relative in candidates:
        correct_prompts, correct_tokens = 0, 0
        for p in range(prompts):
            keep, held = prompt_of != p, prompt_of == p
            if method == "ridge":
                coef, bias = solve_ridge(keep, relative * scale)
                scores = z[held] @ coef + bias
            else:
                cents, present = solve_centroid(keep)
                scores = z[held] @ cents.T - 0.5 * (cents * cents).sum(dim=1)
                scores[:, ~present] = -float("inf")
            tokens = scores.argmax(dim=1)
            correct_tokens += int((tokens == labels[p]).sum())
            correct_prompts += int(torch.bincount(tokens, minlength=num_experts).argmax() == labels[p])
        scored.append((correct_prompts / prompts, correct_tokens / len(x)))
    best = max(range(len(candidates)), key=lambda i: (*scored[i], -i))
    method, relative = candidates[best]
    everything = torch.ones(len(x), dtype=torch.bool)
    if method == "ridge":
        coef, bias = solve_ridge(everything, relative * scale)
        weight = (coef / std[:, None]).T
        bias = torch.full((num_experts,), bias, dtype=z.dtype) - weight @ mean
    else:
        cents, _ = solve_centroid(everything)
        weight = cents / std
        bias = -0.5 * (cents * cents).sum(dim=1) - weight @ mean
    name = "centroid" if method == "centroid" else f"ridge, penalty {relative:g}"
    return name, (weight, bias), *scored[best]


@pytest.fixture(scope="module")
def reference(built, demo_models):
    config = json.loads((built["out"] / "config.json").read_text())
    targets = config["smile_target_modules"]
    features = reference_features(demo_models["base"], built["experts"], built["prompts"], targets)
    labels = [i for i, ps in enumerate(built["prompts"]) for _ in ps]
    fits = {name: reference_fit(features[name], labels, len(built["prompts"]), skip=1) for name in targets}
    return {"features": features, "fits": fits, "labels": labels}


def test_calibrated_output_records_the_fit(built):
    out, summary = built["out"], built["summary"]
    config = json.loads((out / "config.json").read_text())
    assert summary["routing"] == config["smile_routing"] == "calibrated"
    assert config["smile_calibrated_routers"] is True
    report = summary["calibration"]
    assert report["prompts_per_expert"] == [8, 8, 8, 8] and report["shared_start_tokens"] == 1  # BOS
    assert set(report["layers"]) == {"0", "1", "2", "3"} and len(report["modules"]) == 28
    manifest = json.loads((out / "smile_manifest.json").read_text())
    assert manifest["calibration"]["prompts_per_expert"] == [8, 8, 8, 8]
    assert manifest["calibration_fit"]["overall"] == report["overall"]
    assert yaml.safe_load((out / "smile_config.yaml").read_text())["calibrate"].endswith("calibration.yaml")
    card = (out / "README.md").read_text()
    assert "Leave-one-prompt-out accuracy, overall" in card and "--calibrate" in card
    with safe_open(out / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.down_proj.router.calibrated_weight")
        bias = f.get_tensor("model.layers.0.mlp.down_proj.router.calibrated_bias")
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == (4, 256) and bias.shape == (4,)
    assert run(["verify", str(out)]) == 0


def test_routers_equal_an_independent_float64_fit(built, reference):
    report = built["summary"]["calibration"]["modules"]
    with safe_open(built["out"] / "model.safetensors", "pt") as f:
        for name, (method, (weight, bias), prompt_acc, token_acc) in reference["fits"].items():
            assert report[name]["method"] == method, name
            assert report[name]["prompt_accuracy"] == pytest.approx(prompt_acc, abs=1e-9), name
            assert report[name]["token_accuracy"] == pytest.approx(token_acc, abs=1e-9), name
            got_w = f.get_tensor(f"{name}.router.calibrated_weight").double()
            got_b = f.get_tensor(f"{name}.router.calibrated_bias").double()
            x = torch.cat(reference["features"][name])  # the logits on the reference inputs
            want, got = x @ weight.T + bias, x @ got_w.T + got_b
            spread = (want.max(dim=1).values - want.min(dim=1).values).mean()
            assert float((got - want).abs().max()) <= 2e-3 * float(spread), name


def test_leave_one_out_accuracy_is_not_trivial(built):
    """The demo's tasks differ in their characters: the fit tells them apart from the prompts it did not see."""
    overall = built["summary"]["calibration"]["overall"]
    assert overall["prompt_accuracy"] >= 0.75 and overall["token_accuracy"] > 0.5  # chance: 0.25


# ---- generation against an independent float64 model --------------------------------------------------------


@pytest.fixture(scope="module")
def reference_smile(built, reference, demo_models):
    """The independent float64 SMILE model, each token routed by the reference fit: top-1 of W x + b."""

    def route_of(name):
        _, (weight, bias), _, _ = reference["fits"][name]
        return lambda x: (x @ weight.double().T + bias.double()).argmax(dim=1)

    return dense_reference(demo_models["base"], built["experts"], list(reference["fits"]), route_of)


def ids_of(prompt):
    return torch.tensor([[T.BOS, *T.encode(prompt)]])


@torch.no_grad()
def greedy(model, ids, steps=T.MAX_ANSWER_LEN + 1):
    seq = ids
    for _ in range(steps):
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        if nxt.item() == T.EOS:
            break
    return T.decode(seq[0, ids.shape[1] :])


GREEDY = dict(max_new_tokens=T.MAX_ANSWER_LEN + 1, do_sample=False, pad_token_id=T.PAD, eos_token_id=T.EOS)


def test_generation_equals_the_float64_reference(built, reference_smile, demo_models):
    model = AutoModelForCausalLM.from_pretrained(built["out"], trust_remote_code=True, dtype=torch.float32).eval()
    _, test = tiny.held_out(demo_models["tasks"])
    prompts = [p for t in demo_models["tasks"] for p, _ in test[t][:3]]
    want = [greedy(reference_smile, ids_of(p)) for p in prompts]
    with torch.no_grad():
        for use_cache in (True, False):  # one unpadded prompt at a time
            got = [T.decode(model.generate(ids_of(p), use_cache=use_cache, **GREEDY)[0, len(p) + 1 :]) for p in prompts]
            assert got == want, use_cache
        seqs = [[T.BOS, *T.encode(p)] for p in prompts]  # a left-padded batch
        width = max(map(len, seqs))
        ids = torch.tensor([[T.PAD] * (width - len(s)) + s for s in seqs])
        mask = (torch.arange(width) >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
        batch = model.generate(ids, attention_mask=mask, **GREEDY)
        assert [T.decode(row[width:]) for row in batch] == want
        for p in prompts[::4]:  # beams: with and without the cache, as the float64 model's own beam search
            beams = dict(GREEDY, num_beams=3, num_return_sequences=2)
            cached = model.generate(ids_of(p), use_cache=True, **beams)
            assert torch.equal(cached, model.generate(ids_of(p), use_cache=False, **beams))
            assert torch.equal(cached, reference_smile.generate(ids_of(p), use_cache=False, **beams))


def test_calibrated_routing_is_causal_and_can_be_switched_off(built):
    model = AutoModelForCausalLM.from_pretrained(built["out"], trust_remote_code=True, dtype=torch.float32).eval()
    a = ids_of("kqzpab>")
    b = a.clone()
    b[0, 5:] = torch.tensor(T.encode("12|"))
    with torch.no_grad():
        torch.testing.assert_close(model(a).logits[0, :5], model(b).logits[0, :5])
    faithful = AutoModelForCausalLM.from_pretrained(
        built["out"], trust_remote_code=True, dtype=torch.float32, smile_routing="faithful"
    )
    assert faithful.model.layers[0].mlp.up_proj.router.routing == "faithful"


# ---- same bytes, resume ---------------------------------------------------------------------------------------


def test_two_builds_are_byte_identical_and_a_killed_build_resumes_to_them(built, tmp_path):
    argv = [a if a != str(built["out"]) else str(tmp_path / "again") for a in built["argv"] if a != "--json"]
    assert run([*argv, "--quiet"]) == 0
    want = folder_hashes(built["out"])
    assert folder_hashes(tmp_path / "again") == want
    # in parts of 100 KB: killed after its second shard, then resumed
    small = [a if a != str(built["out"]) else str(tmp_path / "parts") for a in built["argv"] if a != "--json"]
    small += ["--max-shard-size", "100KB", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    crash = [sys.executable, str(ROOT / "tests" / "crash_after_shards.py"), "2", *small]
    assert subprocess.run(crash, env=env).returncode != 0
    assert staging_of(tmp_path / "parts").exists() and not (tmp_path / "parts").exists()
    assert run([*small, "--resume"]) == 0
    complete = [a if a != str(tmp_path / "parts") else str(tmp_path / "whole") for a in small]
    assert run(complete) == 0
    assert folder_hashes(tmp_path / "parts") == folder_hashes(tmp_path / "whole")
    assert sum(n.endswith(".safetensors") for n in folder_hashes(tmp_path / "parts")) >= 3


def test_resume_with_another_calibration_file_is_refused(built, tmp_path, capsys):
    changed = tmp_path / "changed.yaml"
    original = Path(built["argv"][built["argv"].index("--calibrate") + 1])
    data = yaml.safe_load(original.read_text())
    data[1] = data[1][:-1]
    changed.write_text(dump(data))
    out = tmp_path / "parts"
    small = [a if a != str(built["out"]) else str(out) for a in built["argv"] if a != "--json"]
    small += ["--max-shard-size", "100KB", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    crash = [sys.executable, str(ROOT / "tests" / "crash_after_shards.py"), "1", *small]
    assert subprocess.run(crash, env=env).returncode != 0
    resumed = [a if a != str(original) else str(changed) for a in small]
    code, err = smile(capsys, *resumed, "--resume")
    assert code == 2 and len(err) == 1 and "calibration" in err[0], err


# ---- memory ---------------------------------------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import json, sys
from types import SimpleNamespace
import torch
from smile_cli.architecture import read_architecture
from smile_cli.calibrate import CalibrationSet, fit_routers
from smile_cli.plan import LinearPlan
from smile_cli.inputs.checks import read_finite
from smile_cli.inputs.local import open_checkpoint
base = open_checkpoint(sys.argv[1])
arch = read_architecture(base.ref, base.config, base.tensors.keys())
linears = [LinearPlan(n, m.out_features, m.in_features, m.has_bias) for n, m in arch.linears.items() if "layers" in n]
experts = [SimpleNamespace(ref=f"e{i}") for i in range(2)]
plan = SimpleNamespace(base=base, architecture=arch, linears=linears, experts=experts)
g = torch.Generator().manual_seed(0)
ids = tuple(tuple([1] + torch.randint(3, 1000, (15,), generator=g).tolist()) for _ in range(4))
calibration = CalibrationSet("-", "-", False, (("a", "b"), ("c", "d")), ids, (0, 0, 1, 1), 1, "base")
def status(key):  # bytes of a /proc/self/status field (VmRSS: now; VmHWM: the peak since the last reset)
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
before = status("VmRSS")
fitted = fit_routers(plan, calibration, read_finite)
after = status("VmHWM")
held = fitted.report["weights_peak_bytes"]
print(json.dumps({"increase": after - before, "routers": len(fitted.routers), "held": held}))
"""


def test_the_streamed_forward_pass_holds_one_layer_not_the_model(tmp_path):
    from synthetic_family import mistral_7b_config, write_family

    config = mistral_7b_config(32, hidden_size=512, intermediate_size=2048, vocab_size=4000)
    base, _ = write_family(tmp_path / "family", config, num_experts=0, dtype=torch.bfloat16)
    params = sum(t.numel() for f in base.glob("*.safetensors") for t in load_file(f).values())
    float32_bytes = 4 * params
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(base)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["routers"] == 32 * 7
    layer_bytes = 4 * (2 * 512 * 512 + 2 * 128 * 512 + 3 * 2048 * 512 + 2 * 512)
    assert measured["held"] == layer_bytes  # one decoder layer at a time (the 4000-row embedding is smaller)
    assert measured["increase"] < 0.25 * float32_bytes, (measured, float32_bytes)


# ---- vLLM -----------------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_vllm_serves_the_calibrated_folder(tmp_path):
    from smile_cli import vllm_env
    from test_vllm import ENGINE_ENV, LLM_ARGS, SHAPE, _skip_reason, prompts
    from test_vllm import reference as vllm_reference
    from tiny_models import make_family

    if _skip_reason() is not None:
        pytest.skip(_skip_reason())
    base, experts = make_family(tmp_path / "llama", "llama", **SHAPE)
    tiny.save_char_tokenizer(base)
    calibration = write_yaml(tmp_path / "c.yaml", {i: [f"{c}{i}{c}x", f"{c}{c}{i}y"] for i, c in enumerate("abc")})
    out = upscaled(base, experts, tmp_path / "smile", "--expert-rank", "16", "--calibrate", calibration, "--quiet")
    assert json.loads((out / "config.json").read_text())["smile_routing"] == "calibrated"
    batch = prompts(1, [3, 9, 17, 30])
    job = {
        "out": str(tmp_path / "results.json"),
        "runs": [
            {
                "model": str(out),
                "llm": {**LLM_ARGS, "max_num_batched_tokens": 64, "enable_chunked_prefill": True},
                "tasks": [{"kind": "batch", "prompts": batch, "max_tokens": 10}],
            }
        ],
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(vllm_env.venv_python()), str(ROOT / "tests" / "vllm_driver.py"), str(tmp_path / "job.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "tasks" in results[0], results
    assert results[0]["tasks"][0]["tokens"] == vllm_reference(out, batch, 10)
