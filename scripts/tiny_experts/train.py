"""The tiny decoder LM (LlamaForCausalLM, character vocabulary) and its training loops.

pretrain():   next-token loss on every token of generic sequences (tasks.gen_generic).
finetune():   loss on the answer tokens only, on one task's training stream. Either full fine-tuning of
              the decoder's linear layers (the seven projections of every layer; embeddings, norms and
              lm_head stay frozen, which is what SMILE upscales) or a peft LoRA adapter on the same
              projections, merged back into a full checkpoint with merge_and_unload() (the unmerged adapter
              can be saved too, with peft's save_pretrained: adapter_config.json + adapter_model.safetensors).
"""

import math
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import tasks as T

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_config(hidden: int, layers: int, heads: int, intermediate: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=T.VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        pad_token_id=T.PAD,
        bos_token_id=T.BOS,
        eos_token_id=T.EOS,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def collate(sequences: list[list[int]], loss_from: list[int]):
    """Right-padded input_ids, attention_mask and labels (-100 before loss_from[i] and on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), T.PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, start) in enumerate(zip(sequences, loss_from, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, start : len(s)] = ids[i, start : len(s)]
    return ids, mask, labels


def generic_batch(rng, batch_size):
    seqs = [[T.BOS] + T.encode(T.gen_generic(rng)) + [T.EOS] for _ in range(batch_size)]
    return collate(seqs, [1] * batch_size)


def task_batch(rng, task, batch_size, exclude: set):
    seqs, starts = [], []
    while len(seqs) < batch_size:
        prompt, answer = T.TASKS[task](rng)
        if prompt in exclude:
            continue
        p = [T.BOS] + T.encode(prompt)
        seqs.append(p + T.encode(answer) + [T.EOS])
        starts.append(len(p))
    return collate(seqs, starts)


def train_loop(model, batch_fn, steps: int, lr: float, weight_decay: float = 0.0, log=print, name=""):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    t0, running = time.time(), None
    for step in range(steps):
        ids, mask, labels = batch_fn()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            log(f"  {name} step {step + 1}/{steps} loss {running:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


def pretrain(cfg: dict, seed: int, log=print) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(cfg["hidden"], cfg["layers"], cfg["heads"], cfg["intermediate"]))
    rng = random.Random(seed)
    return train_loop(
        model,
        lambda: generic_batch(rng, cfg["batch"]),
        cfg["pretrain_steps"],
        cfg["pretrain_lr"],
        weight_decay=0.01,
        log=log,
        name="base",
    )


def finetune(base_dir, task: str, cfg: dict, seed: int, exclude: set, lora: bool, log=print, adapter_dir=None):
    """A fine-tuned copy of the base at base_dir; LoRA adapters are merged into a plain LlamaForCausalLM.

    With lora and adapter_dir, the trained adapter is also saved there unmerged (peft save_pretrained) before
    the merge: the same factors the merged checkpoint was computed from."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], target_modules=PROJECTIONS)
        model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
        lr, steps = cfg["lora_lr"], cfg["lora_steps"]
    else:
        for name, p in model.named_parameters():
            p.requires_grad = any(f"{proj}." in name for proj in PROJECTIONS)
        lr, steps = cfg["finetune_lr"], cfg["finetune_steps"]
    rng = random.Random(f"train-{task}-{seed}")
    tag = ("lora " if lora else "full ") + task
    train_loop(model, lambda: task_batch(rng, task, cfg["batch"], exclude), steps, lr, log=log, name=tag)
    if lora:
        if adapter_dir is not None:
            model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad = True
    return model
