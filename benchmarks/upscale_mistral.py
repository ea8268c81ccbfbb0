"""Upscale Mistral-7B-shaped models with few layers: this tool against a reference-style pipeline, side by side.

Generates base + 3 experts (bfloat16; hidden 4096, intermediate 14336, 8 kv heads x 128, vocab 32000) under
--root, then runs each case in a subprocess (wall time, peak RSS: the run's own VmHWM, smile_cli/memory.py):
  smile-randomized / smile-exact: `python -m smile_cli upscale` at router rank 8, expert rank 128;
  reference: every model loaded whole in float32, a full (thin) torch.linalg.svd per task update as given
             (no transpose), factors kept in memory, saved at the end: the reference algorithm, minimally.
  floor: read every input once (readinto, warm page cache) + write the output's bytes once (+ fsync); the
         factorization's own time comes from the tool's --json summary.
Results: one JSON line per case on stdout and in --results.

  python benchmarks/upscale_mistral.py --layers 2 --cases floor,smile-randomized,reference
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, KV, VOCAB, EXPERTS = 4096, 14336, 1024, 32000, 3
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
SRC = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(SRC))
from smile_cli.memory import PEAK_RSS_RUN, measured_run, print_peak_rss  # noqa: E402


def config(layers: int) -> dict:
    return dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def update(shape, generator, rank=256):
    """A task update with a decaying spectrum, like fine-tuning: sum of rank-one terms with decaying weights."""
    out_f, in_f = shape
    b = torch.randn(out_f, rank, generator=generator) / out_f**0.5
    a = torch.randn(rank, in_f, generator=generator) / in_f**0.5
    decay = 0.02 * torch.exp(-torch.arange(rank) / 40.0)
    return (b * decay) @ a + 2e-4 * torch.randn(shape, generator=generator)


def generate(root: Path, layers: int) -> tuple[Path, list[Path]]:
    folders = [root / "base"] + [root / f"expert{i}" for i in range(EXPERTS)]
    if all((f / "model.safetensors").exists() for f in folders):
        return folders[0], folders[1:]
    generator = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "lm_head.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names.append(f"model.layers.{i}.{norm}.weight")
            shapes[names[-1]] = (HIDDEN,)
        for proj, shape in PROJECTIONS.items():
            names.append(f"model.layers.{i}.{proj}.weight")
            shapes[names[-1]] = shape
    base = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        if index == 0:
            state = base
        else:
            state = {}
            for n in names:
                t = base[n]
                if n.split(".layers.")[-1].split(".", 1)[-1].removesuffix(".weight") in PROJECTIONS:
                    t = (t.float() + update(t.shape, generator)).to(torch.bfloat16)
                state[n] = t
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config(layers), indent=2))
        del state
    return folders[0], folders[1:]


def reference_style(base: Path, experts: list[Path], out: Path, router_rank: int, expert_rank: int) -> None:
    """The reference algorithm, minimally: all models in memory (float32), full SVD per update, save at the end."""
    from safetensors.torch import load_file

    base_state = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()}
    expert_states = [{k: v.float() for k, v in load_file(str(e / "model.safetensors")).items()} for e in experts]
    result = {}
    for name, w0 in base_state.items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(p) for p in PROJECTIONS):
            result[name] = w0.to(torch.bfloat16)
            continue
        result[module + ".shared_linear.weight"] = w0.to(torch.bfloat16)
        routers, svhs, us = [], [], []
        for state in expert_states:
            u, s, vh = torch.linalg.svd(state[name] - w0, full_matrices=False)
            routers.append(vh[:router_rank])
            svhs.append(s[:expert_rank, None] * vh[:expert_rank])
            us.append(u[:, :expert_rank])
        result[module + ".router.weight"] = torch.cat(routers).contiguous()
        result[module + ".experts_svh"] = torch.cat(svhs).to(torch.bfloat16)
        result[module + ".experts_u"] = torch.cat(us, dim=1).to(torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})


def floor(base: Path, experts: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Seconds to read every input byte once (warm page cache) and to write out_bytes once, with fsync."""
    buffer = bytearray(256 * 2**20)
    view = memoryview(buffer)
    started = time.perf_counter()
    for folder in [base, *experts]:
        with open(folder / "model.safetensors", "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    read = time.perf_counter() - started
    started = time.perf_counter()
    with open(scratch, "wb") as f:
        left = out_bytes
        while left > 0:
            n = min(left, len(buffer))
            f.write(view[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - started
    scratch.unlink()
    return {"read_s": round(read, 2), "write_s": round(write, 2)}


def timed(argv: list[str], env=None) -> dict:
    """Run argv (a process that prints its own peak RSS, memory.print_peak_rss): wall seconds, peak RSS, stdout."""
    run = measured_run(argv, env=env)
    if run["rc"] != 0:
        raise RuntimeError(f"{argv} failed:\n{run['stderr'][-3000:]}")
    return {"wall_s": run["wall_s"], "peak_rss_gb": round(run["peak_rss_bytes"] / 1e9, 3), "stdout": run["stdout"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/smile-bench"))
    parser.add_argument("--cases", default="floor,smile-randomized,smile-exact,reference")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--extra", default="", help="extra smile upscale arguments")
    parser.add_argument("--reference-child", nargs=3, metavar=("BASE", "EXPERTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        base, experts, out = args.reference_child
        reference_style(Path(base), [Path(e) for e in experts.split(",")], Path(out), 8, 128)
        print_peak_rss()
        return
    root = args.root / f"L{args.layers}"
    started = time.perf_counter()
    base, experts = generate(root, args.layers)
    print(f"# inputs ready in {time.perf_counter() - started:.0f} s under {root}", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    common = ["--base", str(base), "--experts", ",".join(map(str, experts)), "--router-rank", "8"]
    common += ["--expert-rank", "128", "--force", "--quiet", "--json", *args.extra.split()]
    out_bytes = None
    for case in args.cases.split(","):
        record = {"case": case, "layers": args.layers, "date": time.strftime("%Y-%m-%d %H:%M")}
        if case.startswith("smile-"):
            method = case.removeprefix("smile-")
            argv = [sys.executable, "-c", PEAK_RSS_RUN, "upscale", *common, "--svd", method, "--out", str(root / case)]
            run = timed(argv, env)
            summary = json.loads(run.pop("stdout"))
            out_bytes = summary["output_bytes"]
            record.update(run, factorization=summary["factorization"], output_bytes=out_bytes)
        elif case == "reference":
            argv = [sys.executable, __file__, "--reference-child", str(base), ",".join(map(str, experts))]
            run = timed([*argv, str(root / case)])
            run.pop("stdout")
            record.update(run)
        elif case == "floor":
            nbytes = out_bytes or int(1.35e9 * args.layers / 2 + 0.6e9)  # about the output size at ranks 8/128
            record.update(floor(base, experts, nbytes, root / "floor.tmp"), output_bytes=nbytes)
            record["input_bytes"] = sum((f / "model.safetensors").stat().st_size for f in [base, *experts])
        print(json.dumps(record), flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
