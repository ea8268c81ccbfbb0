"""LoRA experts used natively (issue 6): `smile upscale` from the benchmark's PEFT adapter folders against
`smile upscale` from the same adapters merged into full checkpoints.

    python benchmarks/quality/lora_native.py [--threads 1] [--preset bench]

Reuses the cached tiny Llama base and LoRA experts of benchmarks/quality (tiny.build_or_load(lora=True): each
LoRA expert is kept both as its unmerged PEFT adapter and as the merge_and_unload() checkpoint made from it;
trained only when the cache is cold or lacks the adapters). For each setting below, the SMILE model is built
twice with the CLI (in-process, float32): from the adapter folders (the update scale * B @ A factorized
exactly from its factors) and from the merged checkpoints (the update merged - base, factorized with the
default --svd auto, which is randomized at these ranks; below the LoRA rank also with --svd exact). Every
model is loaded with AutoModelForCausalLM(trust_remote_code=True) and scored with the benchmark's own
evaluation (batched greedy decoding with the KV cache, exact match, 150 test prompts per task); on a fixed
teacher-forced batch the merged builds are compared with the adapter build: max |logit difference|, argmax
tokens and top-expert decisions (every SmileLinear, every token) that differ; and greedy completions that
differ. The experts themselves are compared too (peft's unmerged adapter vs the merged checkpoint). Writes
docs/results/lora_native.md and lora_native.json; benchmarks/quality/lora_native_discussion.md (hand-written)
is appended when present.
"""

import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]  # tiny_experts: scripts/

import evaluate as E  # noqa: E402
import report  # noqa: E402
import smile_grid  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tiny_experts import models as tiny  # noqa: E402

# (router rank, expert rank, top-k, routing): routing.md's setting (expert rank = the LoRA rank 16) with
# faithful routing and the prompt-level variants routing.md found best (prompt-model for full fine-tunes,
# spectral-prompt for LoRA experts); expert rank 4, below the LoRA rank; quality.md's LoRA headline (r2 k4 top-2);
# dense experts.
SETTINGS = [
    (8, "16", 1, "faithful"),
    (8, "16", 1, "prompt-model"),
    (8, "16", 1, "spectral-prompt"),
    (8, "4", 1, "faithful"),
    (2, "4", 2, "faithful"),
    (8, "full", 1, "faithful"),
]
LOGIT_BATCH = 16  # test pairs per task in the fixed teacher-forced batch


def setting_name(router_rank, expert_rank, top_k, routing) -> str:
    experts = "dense" if expert_rank == "full" else f"k{expert_rank}"
    return f"{routing} r{router_rank} {experts} top{top_k}"


def normalised(acc: dict, own: dict) -> float:
    ratios = [acc[t] / own[t] for t in acc if own[t] > 0]
    return sum(ratios) / max(1, len(ratios))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@torch.inference_mode()
def forward_record(model, ids, mask):
    """(logits, {SmileLinear name: top expert per token}) of one teacher-forced forward pass."""
    top: dict[str, torch.Tensor] = {}

    def record(name, w):
        top[name] = w.argmax(dim=-1)

    with E.routing_hook(model, record):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return logits, top


def compare(ref, other, keep: torch.Tensor) -> dict:
    """max |logit difference|, and how many argmax tokens and top-expert decisions (token x SmileLinear) differ,
    of other vs ref on the kept tokens."""
    (la, ta), (lb, tb) = ref, other
    la, lb = la.flatten(0, 1)[keep], lb.flatten(0, 1)[keep]
    return dict(
        max_logit_diff=(la - lb).abs().max().item(),
        max_abs_logit=la.abs().max().item(),
        argmax_differ=[int((la.argmax(-1) != lb.argmax(-1)).sum()), la.shape[0]],
        routing_differ=[sum(int((ta[n][keep] != tb[n][keep]).sum()) for n in ta), len(ta) * int(keep.sum())],
    )


def completions_differ(a: dict, b: dict) -> list[int]:
    pairs = [(x, y) for t in a for x, y in zip(a[t], b[t], strict=True)]
    return [sum(x != y for x, y in pairs), len(pairs)]


def merge_rounding(base_dir: Path, merged_dir: Path, adapter_dir: Path) -> dict:
    """How far the merged checkpoint's update (merged - base, float32 weights) is from the adapter's
    scale * B @ A in float64: max abs error and Frobenius error relative to ||dW||_F, over every module."""
    from smile_cli.inputs.lora import open_adapter

    base, merged = load_file(base_dir / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    adapter = open_adapter(str(adapter_dir), adapter_dir, None)
    factors = load_file(adapter_dir / "adapter_model.safetensors")
    err2 = norm2 = 0.0
    worst = 0.0
    for module, lora in adapter.modules.items():
        exact = lora.scale * factors[lora.b].double() @ factors[lora.a].double()
        diff = merged[module + ".weight"].double() - base[module + ".weight"].double() - exact
        err2 += diff.square().sum().item()
        norm2 += exact.square().sum().item()
        worst = max(worst, diff.abs().max().item())
    return dict(max_abs_error=worst, relative_error=(err2 / norm2) ** 0.5, modules=len(adapter.modules))


def peft_expert(base_dir: Path, adapter_dir: Path):
    """The base with the LoRA adapter applied by peft, unmerged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny.load(base_dir), adapter_dir).eval()


def run(args, log) -> dict:
    models = tiny.build_or_load(args.cache, args.preset, lora=True, log=log)
    names, base = models["tasks"], models["base"]
    merged = [models["experts"][t] for t in names]
    adapters = [models["adapters"][t] for t in names]
    lora_rank = tiny.PRESETS[args.preset]["lora_rank"]
    expert_of = {t: i for i, t in enumerate(names)}
    _, test = tiny.held_out(names)
    ids, mask = E.teacher_forced_batch([pair for t in names for pair in test[t][:LOGIT_BATCH]])
    keep = mask.flatten().bool()
    base_params = E.count_params(tiny.load(base))
    res = {"tasks": names, "lora_rank": lora_rank, "base_params": base_params, "experts": {}, "settings": []}

    own = {}
    for t, m_dir, a_dir in zip(names, merged, adapters, strict=True):
        m_model, a_model = tiny.load(m_dir), peft_expert(base, a_dir)
        m_acc, a_acc = E.accuracy(m_model, {t: test[t]})[t], E.accuracy(a_model, {t: test[t]})[t]
        own[t] = m_acc
        with torch.inference_mode():
            lm = m_model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[keep]
            la = a_model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1)[keep]
        res["experts"][t] = dict(
            merged_acc=m_acc,
            adapter_acc=a_acc,
            max_logit_diff=(lm - la).abs().max().item(),
            merged_bytes=folder_bytes(m_dir),
            adapter_bytes=folder_bytes(a_dir),
            rounding=merge_rounding(base, m_dir, a_dir),
        )
        log(f"expert {t}: merged {m_acc:.3f} adapter (peft) {a_acc:.3f} {res['experts'][t]['rounding']}")
    res["expert_own_test"] = own

    out_root = args.cache / "smile-tmp" / "lora-native"
    oracle_done: dict[tuple, dict] = {}
    for router_rank, expert_rank, top_k, routing in SETTINGS:
        name = setting_name(router_rank, expert_rank, top_k, routing)
        sources = [("adapters", adapters, ()), ("merged", merged, ())]
        if expert_rank != "full" and int(expert_rank) < lora_rank:
            sources.append(("merged, --svd exact", merged, ("--svd", "exact")))
        entry = {"name": name, "router_rank": router_rank, "expert_rank": expert_rank, "top_k": top_k}
        entry.update(routing=routing, builds={})
        reference = None
        for label, experts, extra in sources:
            out = out_root / label.replace(",", "").replace(" ", "_").replace("-", "")
            t0 = time.time()
            smile_grid.upscale(base, experts, out, router_rank, expert_rank, top_k, ("--routing", routing, *extra))
            seconds = time.time() - t0
            model = tiny.load(out)
            preds = E.predictions(model, test)
            acc = E.exact_match(preds, test)
            build = dict(
                test=acc,
                norm=normalised(acc, own),
                params=E.count_params(model),
                bytes=folder_bytes(out),
                upscale_seconds=round(seconds, 2),
            )
            recorded = forward_record(model, ids, mask)
            if reference is None:
                reference = (recorded, preds)
            else:
                build.update(compare(reference[0], recorded, keep))
                build["completions_differ"] = completions_differ(reference[1], preds)
            key = (label, router_rank, expert_rank)
            if key not in oracle_done:  # the routing variant does not change the experts: oracle once per build
                oracle = E.oracle_accuracy(model, test, expert_of)
                oracle_done[key] = dict(test=oracle, norm=normalised(oracle, own))
            build["oracle"] = oracle_done[key]
            entry["builds"][label] = build
            log(
                f"{name} [{label}]: norm {build['norm']:.3f} acc {acc} params {build['params']} "
                + (f"max|dlogit| {build['max_logit_diff']:.2e} " if "max_logit_diff" in build else "")
                + f"({seconds:.1f}s upscale)"
            )
        res["settings"].append(entry)
    shutil.rmtree(out_root, ignore_errors=True)
    return res


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _count(pair):
    return "-" if pair is None else f"{pair[0]:,} of {pair[1]:,}"


def _size(n):
    return f"{n / 2**20:.2f} MiB"


def write_report(results: dict, out: Path, discussion: str) -> None:
    res = results["result"]
    tasks, r = res["tasks"], res["lora_rank"]
    lines = [
        "# LoRA experts used natively: `smile upscale` from adapter folders vs from merged checkpoints",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Runtime: {results['seconds']:.0f} s (training included only when the model cache was cold)  ",
        f"Machine: {results['machine']}",
        "",
        "Generated by `benchmarks/quality/lora_native.py`; raw numbers in `lora_native.json`. Models: the cached "
        f"tiny Llama base and four LoRA experts (rank {r}, lora_alpha {2 * r}, on all seven projections) of "
        "`benchmarks/quality` (see `quality.md`), each kept as its unmerged PEFT adapter (`adapter_config.json` + "
        "`adapter_model.safetensors`) and as the `merge_and_unload()` checkpoint made from it (float32). "
        "Every SMILE model: `smile upscale --experts A,B,C,D --router-rank R --expert-rank K --top-k T --routing "
        "NAME --dtype float32` with A..D the adapter folders (the update scale * B @ A factorized exactly from "
        "its factors) or the merged checkpoints (the update merged - base, `--svd auto`: randomized at these "
        "ranks), loaded with trust_remote_code and decoded greedily with the KV cache (batched, left padding); "
        "150 test prompts per task, the evaluation code of `quality.md` and `routing.md`. Normalised accuracy: "
        "accuracy on task t / expert t's own accuracy (merged expert), averaged over tasks. Oracle: every "
        "SmileLinear forced to the task's own expert (the routing variant does not change it: measured once per "
        "build and router / expert rank). Each merged build against the adapter build of its setting, on "
        f"a fixed teacher-forced batch ({LOGIT_BATCH} test prompts + answers per task, padding excluded): max "
        "|logit difference| (and the largest |logit|, for scale), positions whose argmax token differs, "
        "(token, SmileLinear) routing decisions whose top expert differs; and test prompts whose greedy "
        "completion differs.",
        "",
        "## The experts",
        "",
        "| task | merged expert acc | adapter (peft, unmerged) acc | max abs logit diff (peft vs merged) | "
        "merge rounding: max abs "
        "| merge rounding: relative | adapter file | merged file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tasks:
        e = res["experts"][t]
        lines.append(
            f"| {t} | {_pct(e['merged_acc'])} | {_pct(e['adapter_acc'])} | {e['max_logit_diff']:.1e} | "
            f"{e['rounding']['max_abs_error']:.1e} | {e['rounding']['relative_error']:.1e} | "
            f"{_size(e['adapter_bytes'])} | {_size(e['merged_bytes'])} |"
        )
    lines += [
        "",
        "Merge rounding: (merged - base) against scale * B @ A computed in float64 from the adapter, over all 28 "
        "modules (max abs error; Frobenius error / ||dW||_F): the merged checkpoint holds base + dW rounded to "
        "float32.",
        "",
        "## SMILE from adapters vs from merged checkpoints",
        "",
        "| setting | experts from | " + " | ".join(tasks) + " | normalised | oracle normalised | max abs logit "
        "diff (max abs logit) | argmax differs | routing differs | completion differs | params | output | "
        "upscale time |",
        "|---|---|" + "---:|" * (len(tasks) + 9),
    ]
    for entry in res["settings"]:
        for label, b in entry["builds"].items():
            diff = "reference" if "max_logit_diff" not in b else f"{b['max_logit_diff']:.1e} ({b['max_abs_logit']:.0f})"
            lines.append(
                f"| {entry['name']} | {label} | "
                + " | ".join(_pct(b["test"][t]) for t in tasks)
                + f" | {_pct(b['norm'])} | {_pct(b['oracle']['norm']) if 'oracle' in b else '-'} | {diff} | "
                f"{_count(b.get('argmax_differ'))} | {_count(b.get('routing_differ'))} | "
                f"{_count(b.get('completions_differ'))} | "
                f"{b['params'] / res['base_params']:.2f}x ({b['params']:,}) | {_size(b['bytes'])} | "
                f"{b['upscale_seconds']:.1f} s |"
            )
    own = res["expert_own_test"]
    lines += [
        "",
        "Experts' own-task accuracy (the normalisation): " + ", ".join(f"{t} {_pct(own[t])}" for t in tasks) + ".",
        "",
    ]
    if discussion:
        lines += ["## Discussion", "", discussion.strip(), ""]
    (out / "lora_native.md").write_text("\n".join(lines) + "\n")


def main():
    args = report.parser(__doc__).parse_args()
    log, elapsed = report.start(args.threads)

    results = {**report.provenance("benchmarks/quality/lora_native.py"), "preset": args.preset}
    results["config"] = tiny.PRESETS[args.preset]
    results["result"] = run(args, log)
    results["seconds"] = elapsed()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_native.json").write_text(json.dumps(results, indent=1))
    discussion = HERE / "lora_native_discussion.md"
    write_report(results, args.out, discussion.read_text() if discussion.exists() else "")
    log(f"done in {results['seconds']}s -> {args.out / 'lora_native.md'}")


if __name__ == "__main__":
    main()
