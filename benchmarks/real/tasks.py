"""Generated natural-language tasks for the real-model benchmark, and the lm-eval task files made from them.

Three skills a small instruction model does poorly out of the box and a LoRA learns in minutes: unit conversion,
date reformatting and reversing a list. Their prompts share vocabulary on purpose (numbers, "write", "the", the same
answer-only instruction), as real math/code/chat fine-tunes share most of theirs, so routing cannot lean on one
give-away word. Every split comes from a fixed seed; the same seed always gives the same prompts and answers.
"""

from __future__ import annotations

import random
from pathlib import Path

TASKS = ("units", "dates", "lists")
MONTHS = "January February March April May June July August September October November December".split()
UNITS = (  # (from, to, factor): factors that only append zeros, so the skill is the format, not long multiplication
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("centimeters", "millimeters", 10),
    ("liters", "milliliters", 1000),
    ("tonnes", "kilograms", 1000),
)
SEEDS = {"train": 1000, "dev": 2000, "test": 3000, "gate": 4000}
TRAIN_N = 1200  # 150 steps of batch 8


def _units(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 999)
    return f"How many {dst} are in {n} {src}? Write the number only.", str(n * factor)


def _dates(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    if rng.random() < 0.5:
        text = f"{d} {MONTHS[m - 1]} {y}"
    else:
        text = f"{MONTHS[m - 1]} {d}, {y}"
    return f"Write the date {text} in the format YYYY-MM-DD. Write the date only.", f"{y:04d}-{m:02d}-{d:02d}"


def _lists(rng: random.Random) -> tuple[str, str]:
    items = [str(rng.randint(1, 99)) for _ in range(rng.randint(3, 6))]
    return (
        f"Reverse the order of the numbers {', '.join(items)}. Write the numbers only.",
        ", ".join(reversed(items)),
    )


_MAKERS = {"units": _units, "dates": _dates, "lists": _lists}


def examples(task: str, split: str, n: int) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of one task; held-out splits drop every prompt of the TRAIN_N training ones."""
    rng = random.Random(SEEDS[split] + TASKS.index(task))
    seen = set()
    if split != "train":
        seen = {p for p, _ in examples(task, "train", TRAIN_N)}
    out = []
    while len(out) < n:
        prompt, answer = _MAKERS[task](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def normalise(text: str) -> str:
    """The answer a generation gives: its first line, stripped (what exact match compares)."""
    return text.strip().split("\n")[0].strip()


def write_lm_eval_tasks(folder: Path, n_test: int) -> list[str]:
    """lm-eval 0.4 task files (one YAML + one Parquet file per task) for greedy exact match on the test split.

    The prompt is the bare user message; lm-eval's --apply_chat_template (or apply_chat_template=True in
    simple_evaluate) wraps it in the model's chat template, exactly as the experts were trained.

    The data is Parquet with both columns typed as strings, not JSON lines: the `json` loader of `datasets`
    (pyarrow's JSON reader) infers a timestamp type for strings that look like ISO-8601 dates, so every dates
    answer ("2021-03-14") became the target "2021-03-14 00:00:00" and no answer could match it (the dates
    expert scored 0% under lm-eval against 87.5% on build.py's dev check).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in TASKS:
        data = folder / f"real_{task}.parquet"
        pairs = examples(task, "test", n_test)
        table = pa.table(
            {
                "prompt": pa.array([p for p, _ in pairs], pa.string()),
                "answer": pa.array([a for _, a in pairs], pa.string()),
            }
        )
        pq.write_table(table, data)
        yaml = folder / f"real_{task}.yaml"
        yaml.write_text(
            f"task: real_{task}\n"
            "dataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\n'
            'doc_to_target: "{{answer}}"\n'
            "generation_kwargs:\n  until: ['\\n', '<|im_end|>']\n  do_sample: false\n  max_gen_toks: 24\n"
            "filter_list:\n  - name: first_line\n    filter:\n      - function: regex\n"
            "        regex_pattern: '^\\s*(.*?)\\s*$'\n        group_select: 0\n      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )
        names.append(f"real_{task}")
    return names
