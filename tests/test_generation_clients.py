"""Every kept routing mode through the clients people run models with: transformers generate() (cache on/off, one
unpadded prompt, padded batches, beams, a second chat turn, the model's own generation_config), pipeline, and
lm-eval (generate_until and multiple choice, batch sizes 1 and 8), on tiny trained task experts (the "clients"
preset of scripts/tiny_experts: reverse, sort and mirror experts, trained once into the shared model cache).

References are independent of the model's routing bookkeeping: the per-token modes (faithful, and calibrated, whose
routers `--calibrate` fits to 8 held-out validation prompts per expert) are checked against plain greedy decoding
without the cache; a prompt mode against greedy decoding without the cache whose routing is forced, with
the public routing hook, to the mix recorded on a forward pass over the prompt alone.
"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from helpers import upscaled
from smile_cli.modeling.modeling_smile import PER_TOKEN_ROUTING, ROUTING_MODES
from tiny_experts import models as tiny
from tiny_experts import tasks as T

MODES = list(ROUTING_MODES)
PROMPT_MODES = [m for m in MODES if m not in PER_TOKEN_ROUTING]
NEW = 6  # generated tokens
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=T.PAD, eos_token_id=T.EOS)
PROMPTS = ["kqzp>", "QDXAB:", "48291|", "ab>", "ZYXWV:"]  # reverse, sort, mirror; lengths differ (padding)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    built = tiny.build_or_load(tiny.DEFAULT_CACHE, "clients", log=lambda *_: None)
    experts = [built["experts"][task] for task in built["tasks"]]
    root = tmp_path_factory.mktemp("smile")
    calibration = root / "calibration.yaml"  # "calibrated": routers fitted to 8 training-style prompts per expert
    validation, _ = tiny.held_out(built["tasks"])
    calibration.write_text(json.dumps({i: [p for p, _ in validation[t][-8:]] for i, t in enumerate(built["tasks"])}))
    fitted = ("--calibrate", calibration)
    smile = {
        mode: upscaled(built["base"], experts, root / mode, "--router-rank", "4", "--expert-rank", "full",
                       "--routing", mode, "--quiet", *(fitted if mode.startswith("calibrated") else ()))
        for mode in MODES
    }  # fmt: skip
    return {"base": built["base"], "tasks": built["tasks"], "smile": smile}


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(trained):
    return {mode: load(folder) for mode, folder in trained["smile"].items()}


def ids_of(prompt):
    return torch.tensor([[T.BOS, *T.encode(prompt)]])


def padded(prompts, side):
    seqs = [[T.BOS, *T.encode(p)] for p in prompts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), T.PAD)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


def prompt_mix(model, ids):
    """{router name: weights (T,)} a prompt mode gives every token of the prompt ids (1, L), seen by the hook."""
    seen = {}
    handle = model.register_routing_hook(lambda name, w: seen.setdefault(name, w[0, -1].clone()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return seen


@torch.no_grad()
def reference_greedy(model, mode, ids, steps=NEW, mix=None):
    """Greedy decoding of one unpadded sequence by full forward passes without the cache: faithful as it is; a
    prompt mode with every router forced to `mix` (default: the mix of the prompt ids)."""
    handle = None
    if mode not in PER_TOKEN_ROUTING:
        mix = mix or prompt_mix(model, ids)
        handle = model.register_routing_hook(lambda name, w: mix[name].expand_as(w))
    seq = ids
    try:
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if nxt.item() == T.EOS:
                break
    finally:
        if handle is not None:
            handle.remove()
    return seq


def completion(out, ids):
    return T.decode(out[0, ids.shape[1] :])


@pytest.mark.parametrize("mode", MODES)
def test_single_unpadded_prompt_with_and_without_cache(models, mode):
    model = models[mode]
    for prompt in PROMPTS:
        ids = ids_of(prompt)
        with torch.no_grad():
            cached = model.generate(ids, use_cache=True, **GREEDY)
            recomputed = model.generate(ids, use_cache=False, **GREEDY)
        want = reference_greedy(model, mode, ids)
        assert completion(cached, ids) == completion(want, ids), prompt
        assert completion(recomputed, ids) == completion(want, ids), prompt


@pytest.mark.parametrize("mode", MODES)
def test_beam_search_with_and_without_cache(models, mode):
    model = models[mode]
    for prompt in PROMPTS[:3]:
        ids = ids_of(prompt)
        with torch.no_grad():
            kwargs = dict(GREEDY, num_beams=3, num_return_sequences=2)
            cached = model.generate(ids, use_cache=True, **kwargs)
            recomputed = model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(cached, recomputed), prompt


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_equals_each_prompt_alone(models, mode, mask):
    """With no mask, generate() infers it from the pad token; the routing itself recognises padding either way."""
    model = models[mode]
    ids, attention = padded(PROMPTS, "left")
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=attention if mask else None, use_cache=True, **GREEDY)
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(ids_of(prompt), use_cache=True, **GREEDY)
            assert T.decode(batch[row, ids.shape[1] :]) == completion(alone, ids_of(prompt)), prompt


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_padded_forward_routes_each_row_as_alone(models, mode, side, mask):
    """A plain forward pass (lm-eval's log-likelihood path: right padding, no mask): each row's real tokens get the
    routing weights of the row alone; without a mask the pad token marks the padding."""
    model = models[mode]
    ids, attention = padded(PROMPTS, side)
    seen = {}
    handle = model.register_routing_hook(lambda name, w: seen.__setitem__(name, w.clone()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention if mask else None)
    handle.remove()
    for row, prompt in enumerate(PROMPTS):
        alone = prompt_mix(model, ids_of(prompt))
        real = attention[row].bool()
        for name, weights in seen.items():
            torch.testing.assert_close(weights[row, real], alone[name].expand(int(real.sum()), -1))


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_text_generation(trained, models, mode):
    tokenizer = AutoTokenizer.from_pretrained(trained["base"])
    generator = pipeline("text-generation", model=models[mode], tokenizer=tokenizer)
    for prompt in PROMPTS[:3]:
        want = completion(reference_greedy(models[mode], mode, ids_of(prompt)), ids_of(prompt))
        for use_cache in (True, False):
            out = generator(prompt, return_full_text=False, use_cache=use_cache, **GREEDY)
            assert out[0]["generated_text"] == want, (prompt, use_cache)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_generation_config_use_cache(trained, mode, use_cache):
    """The output folder's own generation_config, with use_cache set either way, decides; same tokens."""
    model = load(trained["smile"][mode])
    model.generation_config.use_cache = use_cache
    ids = ids_of(PROMPTS[0])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert completion(out, ids) == completion(reference_greedy(model, mode, ids), ids)


@pytest.mark.parametrize("mode", MODES)
def test_second_chat_turn_reuses_the_cache(models, mode):
    """Turn 2 continues turn 1's cache. Faithful: as if the conversation were decoded from scratch. A prompt mode:
    the sequence keeps the first prompt's mix (documented), checked against decoding forced to that mix."""
    model = models[mode]
    first = ids_of(PROMPTS[0])
    with torch.no_grad():
        turn1 = model.generate(first, use_cache=True, return_dict_in_generate=True, **GREEDY)
    cache_name = "cache" if getattr(turn1, "cache", None) is not None else "past_key_values"
    conversation = torch.cat([turn1.sequences, torch.tensor([T.encode("123|")])], dim=1)
    with torch.no_grad():
        turn2 = model.generate(conversation, use_cache=True, **{cache_name: getattr(turn1, cache_name)}, **GREEDY)
    mix = None if mode in PER_TOKEN_ROUTING else prompt_mix(model, first)
    want = reference_greedy(model, mode, conversation, mix=mix)
    assert completion(turn2, conversation) == completion(want, conversation)


def test_modes_change_the_answers(models):
    """The prompt modes really route differently from faithful on these experts (the tests above are not vacuous)."""
    outputs = {}
    for mode, model in models.items():
        with torch.no_grad():
            outputs[mode] = [completion(model.generate(ids_of(p), **GREEDY), ids_of(p)) for p in PROMPTS]
    assert any(outputs[m] != outputs["faithful"] for m in PROMPT_MODES)


@pytest.mark.parametrize("mode", MODES)
def test_causality(models, mode):
    """Faithful: logits at t do not change when tokens after t change. Prompt modes are documented as not causal
    within the prompt: the whole input of a plain forward pass is the prompt, and every position routes with the
    one mix pooled over all of it (later tokens included)."""
    model = models[mode]
    a = ids_of("kqzpab>")  # BOS + 7 tokens
    b = a.clone()
    b[0, 5:] = torch.tensor(T.encode("12|"))  # the last 3 tokens changed, the first 5 kept
    weights = []
    handle = model.register_routing_hook(lambda name, w: weights.append(w.detach().reshape(-1, w.shape[-1])))
    try:
        with torch.no_grad():
            la, lb = model(a).logits[0, :5], model(b).logits[0, :5]
    finally:
        handle.remove()
    assert weights
    if mode in PER_TOKEN_ROUTING:
        torch.testing.assert_close(la, lb)
    else:
        for w in weights:  # one mix per sequence: position 0 routes as the last position does
            torch.testing.assert_close(w, w[:1].expand_as(w))


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_flattened_requests_are_refused(models, mode):
    """A serving engine that packs requests into one row (position ids restart) or keeps its own KV cache (a call
    that starts at position > 0 with no transformers cache) gets a clear error, not mixed requests."""
    model = models[mode]
    error = sys.modules[type(model).__module__].SmileRoutingError  # the class of the folder's own modeling file
    packed = torch.cat([ids_of("kqz>"), ids_of("#12")], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad(), pytest.raises(error, match="packs several sequences"):
        model(input_ids=packed, position_ids=positions)
    with torch.no_grad(), pytest.raises(error, match="continues a sequence"):
        model(input_ids=ids_of("a")[:, 1:], position_ids=torch.tensor([[7]]))
    with torch.no_grad():  # faithful serves the same packed row
        faithful = AutoModelForCausalLM.from_pretrained(
            model.name_or_path, trust_remote_code=True, dtype=torch.float32, smile_routing="faithful"
        )
        faithful(input_ids=packed, position_ids=positions)


# ---- lm-eval -------------------------------------------------------------------------------------------------
TASK_YAML = """task: smile_tiny_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{prompt}}}}"
{extra}
metric_list:
  - metric: {metric}
"""


def lm_eval_tasks(tmp_path, tasks):
    validation, _ = tiny.held_out(tasks)  # prompts no model was trained on
    rows = [{"prompt": p, "answer": a, "task": t} for t in tasks for p, a in validation[t][:4]]
    for i, row in enumerate(rows):
        row["choices"] = [row["answer"], rows[(i + 7) % len(rows)]["answer"], row["answer"][::-1] + "0"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(
        TASK_YAML.format(
            kind="gen", data=data, output_type="generate_until", metric="exact_match",
            extra='doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["</s>"]\n  do_sample: false\n'
            f"  max_gen_toks: {NEW}",
        )
    )  # fmt: skip
    (tmp_path / "mc.yaml").write_text(
        TASK_YAML.format(
            kind="mc", data=data, output_type="multiple_choice", metric="acc",
            extra='doc_to_target: 0\ndoc_to_choice: "{{choices}}"\ntarget_delimiter: ""',
        )
    )  # fmt: skip
    return rows


def run_lm_eval(model, tokenizer, tmp_path, batch_size):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=64)
    result = simple_evaluate(
        model=lm,
        tasks=["smile_tiny_gen", "smile_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        verbosity="ERROR",
    )
    samples = {
        task: sorted(result["samples"][task], key=lambda s: s["doc_id"]) for task in ("smile_tiny_gen", "smile_tiny_mc")
    }
    generated = [s["filtered_resps"][0] for s in samples["smile_tiny_gen"]]
    loglikelihoods = [[float(r[0]) for r in s["filtered_resps"]] for s in samples["smile_tiny_mc"]]
    return generated, loglikelihoods, result["results"]


@pytest.mark.parametrize("mode", MODES)
def test_lm_eval_equals_own_evaluation_at_batch_sizes_1_and_8(trained, models, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = lm_eval_tasks(tmp_path, trained["tasks"])
    model = models[mode]
    tokenizer = AutoTokenizer.from_pretrained(trained["base"])
    runs = {bs: run_lm_eval(model, tokenizer, tmp_path, bs) for bs in (1, 8)}
    # the project's own evaluation: greedy decoding of each prompt; log-likelihood of each choice given the prompt
    own_generated, own_ll = [], []
    with torch.no_grad():
        for row in rows:
            ids = ids_of(row["prompt"])
            own_generated.append(completion(model.generate(ids, use_cache=True, **GREEDY), ids))
            lls = []
            for choice in row["choices"]:
                full = torch.cat([ids, torch.tensor([T.encode(choice)])], dim=1)
                # as lm-eval scores: one pass over context + continuation without its last token
                logprobs = model(full[:, :-1]).logits[0, ids.shape[1] - 1 :].log_softmax(-1)
                lls.append(logprobs.gather(1, full[0, ids.shape[1] :, None]).sum().item())
            own_ll.append(lls)
    for batch_size, (generated, loglikelihoods, results) in runs.items():
        assert generated == own_generated, batch_size
        torch.testing.assert_close(torch.tensor(loglikelihoods), torch.tensor(own_ll), rtol=1e-4, atol=1e-4)
        own_acc = sum(g == r["answer"] for g, r in zip(own_generated, rows, strict=True)) / len(rows)
        assert results["smile_tiny_gen"]["exact_match,none"] == pytest.approx(own_acc)
    assert runs[1][2]["smile_tiny_mc"]["acc,none"] == runs[8][2]["smile_tiny_mc"]["acc,none"]
