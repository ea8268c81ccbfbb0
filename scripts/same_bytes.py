"""Build the tiny families' outputs with one source tree and record the sha256 of every file (a refactor's proof).

    python scripts/same_bytes.py families ROOT             # the input families, once (tests/ generators)
    python scripts/same_bytes.py build ROOT SRC LABEL      # every case's output, built with the code in SRC
    python scripts/same_bytes.py compare ROOT LABEL_A LABEL_B

Each case is a subprocess `python -m smile_cli upscale ...` (and its `--dry-run --json`) with PYTHONPATH=SRC, into
the same output path for every source tree (the model card names it), then moved to ROOT/LABEL/<case>; the hashes
of every file (and of the dry runs' stdout, --json and text, and stderr: the warnings) are written to
ROOT/LABEL.json. Tiny Llama / Qwen2 / Mistral families, LoRA experts, a budget, --svd exact, a run in two parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def families(root: Path) -> None:
    sys.path[:0] = [str(ROOT / "tests")]
    from tiny_lora import make_lora
    from tiny_models import make_family

    for arch in ("llama", "qwen2", "mistral"):
        make_family(root / "families" / arch, arch)
    base = root / "families" / "llama" / "base"
    for i in range(2):
        make_lora(
            base,
            root / "families" / "lora" / f"a{i}",
            seed=3 + i,
            r=2 + i,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj"],
        )


def cases(root: Path) -> dict[str, list[list[str]]]:
    fam = root / "families"

    def family(arch):
        return [str(fam / arch / "base"), *(str(fam / arch / f"expert{i}") for i in range(3))]

    def argv(arch_inputs, *options):
        base, *experts = arch_inputs
        return ["upscale", "--base", base, "--experts", ",".join(experts), *options]

    lora = [str(fam / "llama" / "base"), str(fam / "lora" / "a0"), str(fam / "lora" / "a1")]
    mixed = [str(fam / "llama" / "base"), str(fam / "llama" / "expert0"), str(fam / "lora" / "a0")]
    small, ranks = ("--max-shard-size", "8KB"), ("--router-rank", "2", "--expert-rank", "4")
    return {
        "llama": [argv(family("llama"), *ranks)],
        "qwen2": [argv(family("qwen2"), "--router-rank", "2", "--expert-rank", "3")],
        "mistral": [argv(family("mistral"), *ranks, *small)],
        "lora": [argv(lora, *ranks)],
        "lora_mixed": [argv(mixed, "--router-rank", "2", "--expert-rank", "3")],
        "budget": [argv(family("mistral"), "--expert-rank", "auto", "--budget", "1.5x", "--router-rank", "auto")],
        "exact": [argv(family("llama"), "--svd", "exact", *ranks, *small)],
        "parts": [
            argv(family("qwen2"), *ranks, *small, "--shard", "0/2"),
            argv(family("qwen2"), *ranks, *small, "--shard", "1/2"),
            ["assemble", "{out}"],
        ],
    }


def run(src: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "smile_cli", *args], capture_output=True, text=True, env=env)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(root: Path, src: Path, label: str) -> None:
    out, hashes = root / "out" / "smile", {}
    keep = root / label
    shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True)
    for name, steps in cases(root).items():
        shutil.rmtree(out, ignore_errors=True)
        first = steps[0]
        if first[0] == "upscale":
            dry = run(src, [*first, "--out", str(out), "--dry-run", "--json"])
            assert dry.returncode == 0, dry.stderr[-2000:]
            hashes[f"{name}/(dry-run stdout)"] = sha(dry.stdout.encode())
            text = run(src, [*first, "--out", str(out), "--dry-run"])
            assert text.returncode == 0, text.stderr[-2000:]
            hashes[f"{name}/(dry-run text stdout)"] = sha(text.stdout.encode())
            hashes[f"{name}/(dry-run stderr)"] = sha(text.stderr.encode())
        for step in steps:
            args = [a.replace("{out}", str(out)) for a in step]
            if args[0] == "upscale":
                args += ["--out", str(out), "--quiet"]
            result = run(src, args)
            assert result.returncode == 0, (name, result.stderr[-2000:])
        for path in sorted(out.rglob("*")):
            if path.is_file():
                hashes[f"{name}/{path.relative_to(out)}"] = sha(path.read_bytes())
        shutil.move(str(out), keep / name)
        print(name, "ok", flush=True)
    (root / f"{label}.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


def compare(root: Path, a: str, b: str) -> int:
    first, second = (json.loads((root / f"{x}.json").read_text()) for x in (a, b))
    differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    print(f"{len(first)} files in {a}, {len(second)} in {b}, {len(differ)} differ")
    for key in differ:
        print("  differs:", key)
    return 1 if differ else 0


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2])
    if command == "families":
        families(root)
    elif command == "build":
        build(root, Path(sys.argv[3]).resolve(), sys.argv[4])
    else:
        sys.exit(compare(root, sys.argv[3], sys.argv[4]))
