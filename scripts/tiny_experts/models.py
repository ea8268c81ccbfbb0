"""Tiny base + task experts for the SMILE demo, tests and benchmarks: build (train) once, then load from a cache.

Public API:

    build_or_load(cache_dir=DEFAULT_CACHE, preset="demo", lora=False, log=print, workers=1, **overrides) -> dict
        Trains (or reuses, when already in cache_dir) a tiny LlamaForCausalLM base (with a character tokenizer)
        and one fully fine-tuned expert per task (or LoRA experts merged into full checkpoints when lora=True),
        all saved with save_pretrained (safetensors). Returns
            {"base": Path, "experts": {task: Path, ...}, "adapters": {task: Path, ...}, "tasks": [task, ...],
             "train_seconds": {...}}
        in expert order (train_seconds: how long each model took to train when it was first built).
        With lora=True, "adapters" holds each LoRA expert's unmerged PEFT adapter (adapter_config.json +
        adapter_model.safetensors, in EXPERT/adapter), the factors its merged checkpoint "experts" was made
        from; a cached LoRA expert without one is retrained. With lora=False, "adapters" is empty.
        overrides replace fine-tuning settings of the preset (tasks, lora_steps, lora_lr, lora_rank,
        finetune_steps, finetune_lr; they are part of the experts' cache key), never the base's.
        Training runs on one torch thread per process; workers > 1 fine-tunes that many experts at once, one
        process each (the demo uses 2: its critical path is the base's 400 steps and two experts' 600 each, the
        1600 steps the previous demo preset trained in sequence). Deterministic (fixed seeds).
        preset="demo": reverse, sort, mirror, extract, each expert at least 90% on its own held-out prompts
        (see scripts/demo.py); preset="bench" is the larger, longer-trained set of benchmarks/quality (caesar,
        reverse, sort, lookup); preset="clients" is the small, quick set of tests/test_generation_clients.py
        (2 layers, hidden 64; reverse, sort, mirror, each expert about 90% on its own task, 0% on the others).

    load(model_dir), held_out(tasks), save_char_tokenizer(folder)
"""

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from . import tasks as T
from . import train

# The models are trained once and cached here (git-ignored); SMILE_TINY_CACHE moves the cache elsewhere.
DEFAULT_CACHE = Path(os.environ.get("SMILE_TINY_CACHE") or Path(__file__).resolve().parents[2] / ".cache/tiny-experts")

PRESETS = {
    "demo": dict(
        tasks=["reverse", "sort", "mirror", "extract"],
        hidden=128, layers=4, heads=4, intermediate=256, batch=64,
        pretrain_steps=400, pretrain_lr=3e-3,
        finetune_steps=600, finetune_lr=3e-3,
        lora_steps=300, lora_lr=4e-3, lora_rank=16,
        seed=0,
    ),
    "bench": dict(
        tasks=["caesar", "reverse", "sort", "lookup"],
        hidden=128, layers=4, heads=4, intermediate=384, batch=64,
        pretrain_steps=800, pretrain_lr=3e-3,
        finetune_steps=400, finetune_lr=1.5e-3,
        lora_steps=400, lora_lr=4e-3, lora_rank=16,
        seed=0,
    ),
    "clients": dict(
        tasks=["reverse", "sort", "mirror"],
        hidden=64, layers=2, heads=4, intermediate=128, batch=32,
        pretrain_steps=300, pretrain_lr=3e-3,
        finetune_steps=400, finetune_lr=3e-3,
        lora_steps=300, lora_lr=4e-3, lora_rank=8,
        seed=0,
    ),
}  # fmt: skip
N_VAL, N_TEST = 50, 150  # held-out examples per task (never seen in training)


def _fingerprint(cfg: dict, keys) -> str:
    return hashlib.sha1(json.dumps({k: cfg[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:10]


def held_out(tasks):
    """(validation, test) examples per task; both are excluded from every training stream."""
    return T.eval_splits(tasks, N_VAL, N_TEST)


FINETUNE_KEYS = {
    "full": ["tasks", "finetune_steps", "finetune_lr"],
    "lora": ["tasks", "lora_steps", "lora_lr", "lora_rank"],
}
ADAPTER = "adapter"  # a LoRA expert's unmerged PEFT adapter: a subfolder of its merged checkpoint
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _done(folder: Path, adapter: bool = False) -> bool:
    done = (folder / "model.safetensors").exists() and (folder / "train_meta.json").exists()
    if adapter:  # LoRA experts cached before adapters were kept lack these: retrained
        done = done and all((folder / ADAPTER / f).exists() for f in ("adapter_config.json", ADAPTER_WEIGHTS))
    return done


def _save(model, folder: Path, meta: dict):
    model.save_pretrained(folder)  # safetensors
    (folder / "train_meta.json").write_text(json.dumps(meta, indent=1))


def build_or_load(
    cache_dir=DEFAULT_CACHE, preset: str = "demo", lora: bool = False, log=print, workers: int = 1, **overrides
) -> dict:
    unknown = set(overrides) - set(FINETUNE_KEYS["full"] + FINETUNE_KEYS["lora"])
    if unknown:
        raise ValueError(f"only fine-tuning settings can be overridden, not {sorted(unknown)}")
    # Models this small train fastest on one thread; more threads thrash when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_or_load(cache_dir, preset, lora, log, workers, {**PRESETS[preset], **overrides})
    finally:
        torch.set_num_threads(threads)


def _build_or_load(cache_dir, preset, lora, log, workers, cfg) -> dict:
    arch = ["hidden", "layers", "heads", "intermediate", "batch", "pretrain_steps", "pretrain_lr", "seed"]
    base_key = _fingerprint(cfg, arch)
    root = Path(cache_dir).resolve() / f"{preset}-{base_key}"  # absolute: adapters record their base path
    base_dir = root / "base"
    if not _done(base_dir):
        t0 = time.time()
        log(f"pre-training base ({preset}) -> {base_dir}")
        model = train.pretrain(cfg, cfg["seed"], log=log)
        _save(model, base_dir, {"preset": preset, "cfg": cfg, "seconds": time.time() - t0})
    save_char_tokenizer(base_dir)
    kind = "lora" if lora else "full"
    ft_dir = root / f"{kind}-v{T.TASK_VERSION}-{_fingerprint(cfg, FINETUNE_KEYS[kind])}"
    val, test = held_out(cfg["tasks"])
    experts = {task: ft_dir / task for task in cfg["tasks"]}
    adapters = {task: folder / ADAPTER for task, folder in experts.items()} if lora else {}
    jobs = []
    for i, (task, folder) in enumerate(experts.items()):
        if not _done(folder, adapter=lora):
            (folder / "train_meta.json").unlink(missing_ok=True)  # not done until the new model is saved
            exclude = {p for p, _ in val[task] + test[task]}
            seed = cfg["seed"] + 1 + i
            jobs.append((base_dir, task, cfg, seed, exclude, kind, folder, adapters.get(task)))
    if workers > 1 and len(jobs) > 1:  # one process per expert, each on one thread
        log(f"fine-tuning {len(jobs)} {kind} experts, {workers} at a time -> {ft_dir}")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            for done in [pool.submit(_finetune_in_worker, log is print, *job) for job in jobs]:
                done.result()
    else:
        for job in jobs:
            _finetune_and_save(*job, log=log)
    seconds = {"base": json.loads((base_dir / "train_meta.json").read_text())["seconds"]}
    seconds.update({t: json.loads((f / "train_meta.json").read_text())["seconds"] for t, f in experts.items()})
    return {
        "base": base_dir,
        "experts": experts,
        "adapters": adapters,
        "tasks": list(cfg["tasks"]),
        "train_seconds": seconds,
    }


def _finetune_in_worker(verbose: bool, *job) -> None:
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()  # a spawned process starts with transformers' defaults
    transformers.utils.logging.disable_progress_bar()
    _finetune_and_save(*job, log=print if verbose else (lambda *_: None))


def _finetune_and_save(base_dir, task, cfg, seed, exclude, kind, folder, adapter, log=print) -> None:
    """Fine-tune one expert and save it to folder."""
    t0 = time.time()
    model = train.finetune(base_dir, task, cfg, seed, exclude, lora=kind == "lora", log=log, adapter_dir=adapter)
    _save(model, folder, {"task": task, "kind": kind, "cfg": cfg, "seconds": time.time() - t0})


def save_char_tokenizer(folder: Path) -> None:
    """The tasks' character vocabulary as a Hugging Face tokenizer (one token per character, BOS first), so that
    the models and every SMILE model built from them work with AutoTokenizer and `smile route`."""
    saved = folder / "tokenizer.json"
    if saved.exists() and json.loads(saved.read_text()).get("decoder"):  # without a decoder: written before Fuse
        return
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": T.PAD, "<s>": T.BOS, "</s>": T.EOS} | {c: T.encode(c)[0] for c in T.CHARS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decode() joins the characters without spaces
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", T.BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    return model.eval()
