"""The real-model benchmark's lm-eval task files (benchmarks/real/tasks.py), loaded by lm-eval itself: every target
is the generated answer, as a string (a dates answer such as "2021-03-14" was once read as a timestamp by the JSON
loader, and no generation could match "2021-03-14 00:00:00"), and the greedy-answer filter keeps a correct first
line and a correct answer followed by more lines."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "real"))
import tasks as T  # noqa: E402

pytest.importorskip("lm_eval")


def test_targets_are_the_answers_as_strings(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    names = T.write_lm_eval_tasks(tmp_path, 12)
    loaded = get_task_dict(names, TaskManager(include_path=str(tmp_path)))
    for task in T.TASKS:
        lm_task = loaded[f"real_{task}"]
        docs = list(lm_task.test_docs())
        want = T.examples(task, "test", 12)
        assert [lm_task.doc_to_text(d) for d in docs] == [p for p, _ in want]
        targets = [lm_task.doc_to_target(d) for d in docs]
        assert targets == [a for _, a in want], (task, targets[:3])
        assert all(isinstance(d["answer"], str) for d in docs)
        # the filter and the metric as lm-eval applies them to a generation (until '\n' has already cut it)
        answer = want[0][1]
        resps = [[f"  {answer} "], [answer + "x"]]
        for make in lm_task._filters[0].filters:
            resps = make().apply(resps, docs[:2])
        kept = list(resps)
        metric = lm_task._metric_fn_list["exact_match"]
        assert metric(references=[answer], predictions=[kept[0]])["exact_match"] == 1.0
        assert metric(references=[answer], predictions=[kept[1]])["exact_match"] == 0.0
