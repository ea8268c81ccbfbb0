"""LoRA experts used natively: SMILE built from trained PEFT adapter folders is the SMILE built from the same
adapters merged into full checkpoints (the benchmark of this on the larger benchmark models:
benchmarks/quality/lora_native.py, docs/results/lora_native.md)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import upscaled
from tiny_experts import evaluate as E
from tiny_experts import models

pytestmark = pytest.mark.slow

# Two LoRA experts (rank 16, all seven projections) on the demo base, briefly trained: 10-25 s each on one
# thread. On the first 50 test prompts per task the experts alone score 14% (sort) and 26% (lookup), the SMILE
# builds 0% and 22% with faithful routing, 14% and 26% with prompt-model routing; the base 0%.
QUICK_LORA = dict(tasks=["sort", "lookup"], lora_steps=50, lora_lr=8e-3)
N_TEST = 50  # test prompts per task
# The merged checkpoints hold base + scale * B @ A rounded to float32, so the two builds differ by float32
# rounding only: max |logit difference| on the teacher-forced batch measured 1.9e-5 (faithful) and 6.8e-5
# (prompt-model), logits up to ~10.5; with the first adapter's scale halved it is 9.7 (the negative control).
LOGIT_TOL = 5e-4


OPTIONS = ("--router-rank", "8", "--expert-rank", "16", "--top-k", "1", "--quiet")


@pytest.fixture(scope="module")
def lora_models(demo_models):
    # on the demo's base (the demo_models fixture trains it when the shared cache is cold)
    return models.build_or_load(models.DEFAULT_CACHE, "demo", lora=True, log=lambda *_: None, **QUICK_LORA)


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@torch.inference_mode()
def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[mask.flatten().bool()]


@pytest.mark.parametrize("routing", ["faithful", "prompt-model"])
def test_adapters_give_the_merged_model(lora_models, tmp_path, routing):
    names = lora_models["tasks"]
    adapters = [lora_models["adapters"][t] for t in names]
    merged = [lora_models["experts"][t] for t in names]
    for adapter, expert in zip(adapters, merged, strict=True):
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
        assert (adapter / "adapter_model.safetensors").is_file() and (expert / "model.safetensors").is_file()
    _, test = models.held_out(names)
    test = {t: test[t][:N_TEST] for t in names}
    ids, mask = E.teacher_forced_batch([pair for t in names for pair in test[t][:20]])

    options = (*OPTIONS, "--routing", routing)
    native = load(upscaled(lora_models["base"], adapters, tmp_path / "native", *options))
    dense = load(upscaled(lora_models["base"], merged, tmp_path / "merged", *options))
    reference = logits(native, ids, mask)
    diff = (reference - logits(dense, ids, mask)).abs().max().item()
    assert diff < LOGIT_TOL, diff
    native_preds, dense_preds = E.predictions(native, test), E.predictions(dense, test)
    assert native_preds == dense_preds  # the same greedy completion for every test prompt
    accuracy = E.exact_match(native_preds, test)
    assert accuracy == E.exact_match(dense_preds, test)
    assert sum(accuracy.values()) > 0, accuracy  # not a comparison of two all-wrong models

    if routing == "faithful":
        # negative control: the first adapter with lora_alpha halved (scale 1 instead of 2) moves the logits far
        # beyond the tolerance, so a wrong scale in smile_cli.inputs.lora could not pass the checks above
        wrong = tmp_path / "wrong-scale"
        shutil.copytree(adapters[0], wrong)
        config = json.loads((wrong / "adapter_config.json").read_text())
        config["lora_alpha"] /= 2
        (wrong / "adapter_config.json").write_text(json.dumps(config))
        off = load(
            upscaled(lora_models["base"], [wrong, *adapters[1:]], tmp_path / "off", *OPTIONS, "--routing", routing)
        )
        assert (reference - logits(off, ids, mask)).abs().max().item() > 100 * LOGIT_TOL
