"""routing_variants.py against the modeling_smile.py that still implemented those modes (commit 6222ba8).

    python benchmarks/quality/routing_variants_check.py [--sets full,lora] [--variants a,b,...] [--prompts 40]

For each expert set: one faithful `smile upscale` of the cached bench models; for each variant, a copy of that
folder with the old modeling file (from git) and `smile_routing` set to the variant, against the faithful folder
with the variant installed by routing_variants.install. Prints how many greedy completions (batched, left
padding, KV cache) agree and the largest teacher-forced logit difference. Needs the git history (run from a
clone) and the models cached by routing.py.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]

import evaluate as E  # noqa: E402
import report  # noqa: E402
import routing as R  # noqa: E402
import routing_variants as RV  # noqa: E402
import torch  # noqa: E402

from tiny_experts import models as tiny  # noqa: E402

OLD = "6222ba8"  # the last commit whose modeling_smile.py implements every routing variant


def main():
    ap = report.parser(__doc__)
    ap.add_argument("--sets", default="full,lora")
    ap.add_argument("--variants", default=",".join(n for n in RV.VARIANTS if n not in RV.RESEARCH))
    ap.add_argument("--prompts", type=int, default=40, help="test prompts per task")
    args = ap.parse_args()
    log, _ = report.start(args.threads or 1)
    old_file = subprocess.run(
        ["git", "show", f"{OLD}:smile_cli/modeling/modeling_smile.py"],
        cwd=HERE, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    failures = 0
    for kind in args.sets.split(","):
        models = tiny.build_or_load(args.cache, args.preset, lora=(kind == "lora"), log=log)
        names = models["tasks"]
        test = {t: pairs[: args.prompts] for t, pairs in tiny.held_out(names)[1].items()}
        out = args.cache / "smile-tmp" / f"check-{kind}"
        R.upscale(models["base"], list(models["experts"].values()), out, 8, "16", 1, "faithful")
        ids, mask = E.teacher_forced_batch([p for t in names for p in test[t]])
        for variant in args.variants.split(","):
            old = out.with_name(f"check-{kind}-old")
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(out, old)
            (old / "modeling_smile.py").write_text(old_file)
            config = json.loads((old / "config.json").read_text())
            (old / "config.json").write_text(json.dumps({**config, "smile_routing": variant}))
            before, after = tiny.load(old), RV.install(tiny.load(out), variant)
            a, b = E.predictions(before, test), E.predictions(after, test)
            same = sum(x == y for t in names for x, y in zip(a[t], b[t], strict=True))
            with torch.inference_mode():
                logits = [m(input_ids=ids, attention_mask=mask).logits for m in (before, after)]
            diff = (logits[0] - logits[1])[mask.bool()].abs().max().item()
            total = len(names) * args.prompts
            failures += same != total or diff != 0
            log(f"[{kind}] {variant}: {same}/{total} completions equal, teacher-forced logits max |diff| {diff:.1e}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
