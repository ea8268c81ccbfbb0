"""benchmarks/quality/routing_hard.py: the cued tasks, the mixed prompts' oracle segments and the oracles'
cache-free decoding loop (against generate() with the KV cache, unforced and forced through the routing hook)."""

import random
import string
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks" / "quality")]

import routing_hard as H  # noqa: E402

from tiny_experts import tasks as T  # noqa: E402
from tiny_experts.evaluate import generate  # noqa: E402


def _expected(task, s):  # each operation written out index by index, not as the generator's slicing
    n = len(s)
    if task == "flip":
        return "".join(s[n - 1 - i] for i in range(n))
    if task == "roll":
        return "".join(s[(i + 1) % n] for i in range(n))
    if task == "back":
        return "".join(s[(i - 1) % n] for i in range(n))
    return "".join(s[i + 1] if i % 2 == 0 and i + 1 < n else s[i - 1] if i % 2 else s[i] for i in range(n))


def test_cued_tasks_share_alphabet_and_format():
    rng = random.Random(0)
    for task in T.CUED_OPS:
        for fmt in (*T.CUED_FORMATS, "double"):
            for _ in range(50):
                prompt, answer = T.cued_example(rng, task, fmt)
                assert H.format_of(prompt) == fmt
                body = prompt[:-1].split(";")
                answers = answer.split(";")
                assert prompt.endswith("=") and len(body) == len(answers) == (2 if fmt == "double" else 1)
                for part, ans in zip(body, answers, strict=True):
                    cue, s = part.split(":") if fmt != "later" else part.split(":")[::-1]
                    assert cue == task and set(s) <= set(string.ascii_lowercase)
                    assert ans == _expected(task, s)
    assert T.cued_example(random.Random(1), "flip", "mixed", "swap")[0].split(";")[1].startswith("swap:")


def test_mixed_segments_follow_the_predicted_token():
    prompt = "flip:abc;roll:wxyz="
    assert H.segments(prompt, "", 3, 1) == [3] * 9 + [1] * 10 + [3]
    assert H.segments(prompt, "cba;xy", 3, 1) == [3] * 9 + [1] * 10 + [3] * 4 + [1] * 3


@pytest.fixture(scope="module")
def smile_demo(demo_models, tmp_path_factory):
    import routing as R

    from tiny_experts import models as tiny

    base, experts = demo_models["base"], list(demo_models["experts"].values())
    out = R.upscale(base, experts, tmp_path_factory.mktemp("smile-hard") / "m", 4, "8", 1, "faithful")
    return tiny.load(out)


def test_forced_loop_matches_generate(smile_demo):
    model = smile_demo
    prompts = ["abcde>", "QDXA:", "48290|", "kqzpe>"]
    assert H.forced_generate(model, prompts, lambda i, text: None, 6) == generate(model, prompts, max_new_tokens=6)

    def one_hot(name, w):
        return torch.nn.functional.one_hot(torch.full(w.shape[:-1], 2), w.shape[-1]).to(w)

    handle = model.register_routing_hook(one_hot)
    try:
        cached = generate(model, prompts, max_new_tokens=6)
    finally:
        handle.remove()
    forced = H.forced_generate(model, prompts, lambda i, text: [2] * (1 + len(prompts[i]) + len(text)), 6)
    assert forced == cached
    assert forced != H.forced_generate(model, prompts, lambda i, text: [0] * (1 + len(prompts[i]) + len(text)), 6)


def test_test_sets_leave_out_two_letter_strings():
    sets = H.test_sets(H.CUED)
    assert H._strings("ab:flip=") == ["ab"] and H._strings("flip:abc;roll:de=") == ["abc", "de"]
    for f, by in sets.items():
        for pairs in by.values():
            assert pairs and all(len(s) >= 3 for p, _ in pairs for s in H._strings(p)), f


def test_forced_rows_route_each_row_to_its_expert(smile_demo):
    import routing_variants as RV

    model = smile_demo
    prompts = ["abcde>", "QDXA:", "48290|", "kqzpe>"]
    experts = torch.tensor([2, 0, 2, 1])
    with RV.forced_rows(model, experts):
        together = generate(model, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):  # each row alone, its expert forced on every token
        alone = H.forced_generate(model, [p], lambda _, text, e=int(experts[i]), p=p: [e] * (1 + len(p) + len(text)), 6)
        assert together[i] == alone[0]
    picked = RV.likelihood_experts(model, *H._left_pad(prompts))
    assert picked.shape == (4,) and int(picked.min()) >= 0 and int(picked.max()) < model.config.num_local_experts
