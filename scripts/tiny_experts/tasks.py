"""Character vocabulary, the synthetic tasks and the generic pre-training mixture.

Every task maps a prompt to a short answer; the answer is followed by EOS. There is no task-id token: the
task is recognisable only from the content and format of the prompt:

    add      "47+85="           -> "132"          (2-digit numbers, '+', '=')
    reverse  "kqzpe>"          -> "epzqk"        (lowercase letters, '>')
    sort     "QDXA:"           -> "ADQX"         (uppercase letters, ':')
    lookup   "c=4,a=7,f=1;a?"  -> "7"            (2-4 key=value pairs, ';', '?')
    caesar   "#4829"           -> "5930"         ('#', digits, each shifted by one mod 10)
    mirror   "48290|"          -> "09284"        (digits, '|')
    extract  "k3m9pq2."        -> "392"          (lowercase letters and digits, '.': the digits in order)

The demo's experts learn reverse, sort, mirror and extract within a few hundred steps on its small base;
caesar (a per-digit successor map) and lookup (a two-hop retrieval) take thousands (benchmarks only).

The cued tasks (benchmarks/quality/routing_hard.py) share one input alphabet and one format; only a short cue
word says which operation to apply, at the start of the prompt or after the string (the expert's training stream
mixes both; "doubles", two sub-problems of its own task in one prompt with answers joined by ';', and mixed prompts
are never trained on):

    flip     "flip:kqzpe=" or "kqzpe:flip="   -> "epzqk"      (reverse)
    roll     "roll:kqzpe=" or "kqzpe:roll="   -> "qzpek"      (rotate left by one)
    back     "back:kqzpe=" or "kqzpe:back="   -> "ekqzp"      (rotate right by one)
    swap     "swap:kqzpe=" or "kqzpe:swap="   -> "qkpze"      (swap adjacent pairs; an odd last letter stays)
    double   "flip:abc;flip:xyz="             -> "cba;zyx"    (evaluation only)
    mixed    "flip:abc;roll:xyz="             -> "cba;yzx"    (two different tasks: evaluation only)

(strings of 2-5 letters; a double's or a mixed prompt's sub-problems 2-3 letters each)

The pre-training mixture uses the same characters and separators in generic patterns (random words,
copies, alphabet/digit runs) so that the base knows the alphabet but none of the task mappings.
"""

import random
import string

PAD, BOS, EOS = 0, 1, 2
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +=>:;?,#.-|"
VOCAB_SIZE = 3 + len(CHARS)
_CHAR_TO_ID = {c: i + 3 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    return [_CHAR_TO_ID[c] for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i >= 3:
            out.append(CHARS[i - 3])
    return "".join(out)


def _letters(rng, alphabet, lo, hi):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def gen_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def gen_reverse(rng):
    s = _letters(rng, string.ascii_lowercase, 4, 8)
    return s + ">", s[::-1]


def gen_sort(rng):
    s = _letters(rng, string.ascii_uppercase, 4, 8)
    return s + ":", "".join(sorted(s))


def gen_lookup(rng):
    keys = rng.sample(string.ascii_lowercase, rng.randint(2, 4))
    values = [rng.choice(string.digits) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return f"{pairs};{keys[query]}?", values[query]


def gen_caesar(rng):
    """A Caesar shift by one over the digit alphabet: '#4829' -> '5930'."""
    s = _letters(rng, string.digits, 4, 8)
    return "#" + s, "".join(str((int(c) + 1) % 10) for c in s)


def gen_mirror(rng):
    s = _letters(rng, string.digits, 4, 8)
    return s + "|", s[::-1]


def gen_extract(rng):
    """The digits of a mixed string, in order: 'k3m9pq2.' -> '392' (at least one digit, at most 8)."""
    while True:
        s = _letters(rng, string.ascii_lowercase + string.digits, 5, 10)
        digits = "".join(c for c in s if c.isdigit())
        if 1 <= len(digits) <= MAX_ANSWER_LEN:
            return s + ".", digits


CUED_OPS = {
    "flip": lambda s: s[::-1],
    "roll": lambda s: s[1:] + s[:1],
    "back": lambda s: s[-1:] + s[:-1],
    "swap": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
}
CUED_FORMATS = ("start", "later")  # the training stream's; "double" and "mixed" are evaluation formats


def cued_example(rng, task: str, fmt: str, other: str | None = None):
    """One cued prompt of task in format fmt ('start', 'later', 'double', or 'mixed' with the second
    sub-problem of task other) and its answer."""
    if fmt in ("start", "later"):
        s = _letters(rng, string.ascii_lowercase, 2, 5)
        prompt = f"{task}:{s}=" if fmt == "start" else f"{s}:{task}="
        return prompt, CUED_OPS[task](s)
    second = task if fmt == "double" else other
    a, b = (_letters(rng, string.ascii_lowercase, 2, 3) for _ in range(2))
    return f"{task}:{a};{second}:{b}=", f"{CUED_OPS[task](a)};{CUED_OPS[second](b)}"


def _cued(task):
    """The training / held-out stream of a cued task: cue at start or later, equally likely."""
    return lambda rng: cued_example(rng, task, rng.choice(CUED_FORMATS))


TASKS = {
    "add": gen_add,
    "reverse": gen_reverse,
    "sort": gen_sort,
    "lookup": gen_lookup,
    "caesar": gen_caesar,
    "mirror": gen_mirror,
    "extract": gen_extract,
    **{task: _cued(task) for task in CUED_OPS},
}
TASK_VERSION = 3  # bump when a generator changes: it is part of the fine-tuned models' cache key
MAX_ANSWER_LEN = 8  # longest answer of any task (reverse/sort/caesar/mirror/extract: 8; add: 3 digits)
CUED_MAX_ANSWER_LEN = 7  # a double / mixed answer: two sub-problems of up to 3 letters and ';'


def gen_generic(rng) -> str:
    """One generic pre-training sequence: random words, copies and runs over the task alphabet."""
    kind = rng.random()
    alphabets = [string.digits, string.ascii_lowercase, string.ascii_uppercase]
    seps = " +=>:;?,#.-|"
    if kind < 0.4:  # random words of one character class, random separators
        words = [_letters(rng, rng.choice(alphabets), 1, 6) for _ in range(rng.randint(2, 6))]
        text = ""
        for w in words:
            text += w + rng.choice(seps)
        return text[:40]
    if kind < 0.75:  # a copy: s <sep> s  (teaches attention to look back)
        s = _letters(rng, rng.choice(alphabets), 2, 10)
        return s + rng.choice(seps) + s
    # a run through an alphabet: "defgh", "34567", with wrap-around
    alphabet = rng.choice(alphabets)
    start, n = rng.randrange(len(alphabet)), rng.randint(3, 12)
    run = "".join(alphabet[(start + j) % len(alphabet)] for j in range(n))
    return run + rng.choice(seps) + run[::2]


def make_split(task: str, n: int, seed: int, exclude: set | None = None) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of a task, none of whose prompts is in exclude."""
    rng = random.Random(f"{task}-{seed}")
    seen, out = set(exclude or ()), []
    while len(out) < n:
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return out


def eval_splits(tasks, n_val: int, n_test: int, seed: int = 1234):
    """Held-out validation and test examples per task (disjoint prompts)."""
    val, test = {}, {}
    for t in tasks:
        test[t] = make_split(t, n_test, seed)
        val[t] = make_split(t, n_val, seed + 1, exclude={p for p, _ in test[t]})
    return val, test
