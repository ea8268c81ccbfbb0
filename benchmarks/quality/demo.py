"""The bundled tiny default, end to end: the README's first command.

    python benchmarks/quality/demo.py [--out smile-demo/model] [--routing prompt-model]

1. Builds (first run: about 2 minutes on 2 cores) or reuses a tiny character-level Llama base and four experts
   fully fine-tuned on synthetic tasks (caesar cipher, string reversal, sorting, key-value lookup), cached in
   benchmarks/quality/.cache. The task is recognisable only from the prompt's format: no task-id token.
2. Runs the real `smile upscale` on them (the command is printed).
3. Scores base, each expert, a simple average of the experts, and the SMILE model on held-out prompts
   (exact match, greedy decoding) and prints the per-task accuracy table and where the model was written.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merging  # noqa: E402
import tasks as T  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

CACHE = HERE / ".cache"


def save_char_tokenizer(folder: Path) -> None:
    """The tasks' character vocabulary as a Hugging Face tokenizer (one token per character, BOS first), so the
    upscaled model can be used with AutoTokenizer and `smile route`."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": T.PAD, "<s>": T.BOS, "</s>": T.EOS} | {c: T.encode(c)[0] for c in T.CHARS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", T.BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)


def average_model(base: Path, experts: list[Path], out: Path) -> Path:
    """The simple average of the experts (the plain merge SMILE is compared with), saved to out."""
    if not (out / "model.safetensors").exists():
        model = tiny.load(base)
        merged = merging.simple_average(model.state_dict(), [tiny.load(e).state_dict() for e in experts])
        model.load_state_dict(merged)
        model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("smile-demo") / "model")
    parser.add_argument("--router-rank", default="8")
    parser.add_argument("--expert-rank", default="16")
    parser.add_argument("--top-k", default="1")
    parser.add_argument("--routing", default="prompt-model", help="smile upscale --routing (see docs/results)")
    parser.add_argument("--examples", type=int, default=100, help="held-out prompts per task")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core free
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    models = tiny.build_or_load(CACHE, "demo")
    base, experts = models["base"], [models["experts"][t] for t in models["tasks"]]
    save_char_tokenizer(base)
    command = [
        "smile", "upscale", "--base", str(base), "--experts", ",".join(map(str, experts)), "--out", str(args.out),
        "--router-rank", args.router_rank, "--expert-rank", args.expert_rank, "--top-k", args.top_k,
        "--routing", args.routing, "--svd", "exact", "--force", "--quiet",
    ]  # fmt: skip
    print("$ " + shlex.join(command), flush=True)
    subprocess.run([sys.executable, "-m", "smile_cli", *command[1:]], check=True)

    rows = {"base": base}
    rows |= {f"expert: {t}": folder for t, folder in zip(models["tasks"], experts, strict=True)}
    rows["simple average"] = average_model(base, experts, args.out.parent / "average")
    rows[f"SMILE ({args.routing})"] = args.out
    print(f"\nExact-match accuracy (%) on {args.examples} held-out prompts per task:\n")
    header = f"| {'model':<24} | " + " | ".join(f"{t:>7}" for t in models["tasks"]) + " |    mean |"
    print(header + "\n|---|" + "---:|" * (len(models["tasks"]) + 1))
    for name, folder in rows.items():
        accuracy = tiny.evaluate(folder, models["tasks"], n=args.examples)
        cells = " | ".join(f"{100 * accuracy[t]:7.1f}" for t in models["tasks"])
        print(f"| {name:<24} | {cells} | {100 * sum(accuracy.values()) / len(accuracy):7.1f} |", flush=True)
    print(f"\nSMILE model written to {args.out} ({time.perf_counter() - started:.0f} s in all).")
    print(f"Load it: AutoModelForCausalLM.from_pretrained('{args.out}', trust_remote_code=True)")
    print(f"See its routing: smile route {args.out} --prompt 'QWERTY:' --prompt 'e=9,y=4;y?'")


if __name__ == "__main__":
    main()
