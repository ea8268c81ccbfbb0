"""The output's vocabulary: its tokenizer (`--tokenizer base|union|N`), its chat template
(`--chat-template auto|base|N|FILE`), and the rows of the input embeddings and output head that follow them.

Tokens are matched across tokenizers by their string, never by their id: an expert's token is "new" when the
base's vocabulary lacks its string, and its embedding and output-head rows are read at the id that expert gives
it (the mean over the experts that define it), whatever id it gets in the output. Every base token keeps the
base's rows: SMILE keeps the base's embeddings. An expert's vocabulary must hold every base token at the base's
id (an extension of it), or be accepted with `allow_vocab_mismatch`.

Planning (plan_vocabulary) reads tokenizers and headers only; the rows are read when the tensor is written
(vocab_tensor), a few rows per new token, so memory holds the base tensor, the output tensor and one row.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smile_cli.errors import InputError, SmileError
from smile_cli.files import JSON_ERRORS, load_json
from smile_cli.inputs.checkpoint import Checkpoint
from smile_cli.inputs.pickles import PickleCheckpoint
from smile_cli.inputs.safetensors_format import read_tensor

# Files that make up a tokenizer, and those that hold a chat template (copied from the tokenizer's source).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# config.json fields that name token ids: taken from the config of the tokenizer's source.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

log = logging.getLogger("smile")


@dataclass(frozen=True)
class NewToken:
    """A token of the output that the base lacks: its id there, and (expert index, that expert's id) of each
    expert that defines it; its rows are the mean of those experts' rows."""

    content: str
    id: int
    sources: tuple[tuple[int, int], ...]


@dataclass
class Vocabulary:
    mode: str  # base | union | N (the N-th expert's tokenizer, 1-based)
    size: int  # rows of the output's input embeddings and output head
    base_size: int  # rows of the base's
    tensors: tuple[str, ...] = ()  # base tensors whose rows follow the vocabulary (embeddings, head, tied copies)
    new_tokens: list[NewToken] = field(default_factory=list)
    # output row -> base row (-1: a new token's); None: row i is the base's row i
    base_rows: list[int] | None = None
    tokenizer: object | None = None  # the union's tokenizer, built in memory, saved with the output
    source: Checkpoint | None = None  # where the tokenizer files are copied from (None: written from .tokenizer)
    notes: list[str] = field(default_factory=list)  # for the card: renumbered tokens, ignored vocabularies
    template: str | list | None = None
    template_origin: str = "none"  # for people: "the base's", "expert 2's", a file
    template_kept: bool = True  # the tokenizer source's own template files are kept as they are

    @property
    def computed(self) -> bool:
        """Whether the embedding and head rows differ from the base's (else those tensors are copied)."""
        return bool(self.new_tokens) or self.base_rows is not None or self.size != self.base_size

    def summary(self) -> dict:
        return {
            "tokenizer": self.mode,
            "vocab_size": self.size,
            "new_tokens": {t.content: t.id for t in self.new_tokens},
            "chat_template": self.template_origin,
            "notes": list(self.notes),
        }


def plan_vocabulary(options, base: Checkpoint, experts: list, architecture) -> tuple[Vocabulary, list[str]]:
    """(the output's Vocabulary, from the options and the inputs' tokenizers; the warnings of its checks);
    InputError on what cannot be done. experts: inputs.experts.Expert."""
    warnings: list[str] = []
    embeddings = _vocab_tensors(base, architecture)
    base_size = base.tensors[embeddings[0]].shape[0] if embeddings else int(base.config.get("vocab_size") or 0)
    mode = options.tokenizer
    full = [e.checkpoint for e in experts]  # None for a LoRA adapter (inputs/experts.py)
    if mode not in ("base", "union") and not 1 <= int(mode) <= len(experts):
        raise InputError(f"--tokenizer {mode}: there are {len(experts)} experts (give 1 to {len(experts)})")
    if mode not in ("base", "union") and full[int(mode) - 1] is None:
        raise InputError(f"--tokenizer {mode}: expert {experts[int(mode) - 1].ref} is a LoRA adapter, not a model")
    needed = mode != "base" or (has_tokenizer(base.path) and any(e and has_tokenizer(e.path) for e in full))
    base_tokenizer = load_tokenizer(base, required=mode != "base") if needed else None
    base_vocab = base_tokenizer.get_vocab() if base_tokenizer is not None else None
    vocabs: list[tuple[dict | None, object]] = []  # per expert: (its vocabulary if its tokens count, its tokenizer)
    for index, expert in enumerate(full):
        chosen = mode == str(index + 1)
        tokenizer = load_tokenizer(expert, required=chosen) if expert and base_vocab is not None else None
        vocab = tokenizer.get_vocab() if tokenizer is not None else None
        if vocab is not None and _differs(expert, vocab, base, base_vocab, options, warnings) and not chosen:
            vocab = None  # accepted, but its tokens are not taken (only --tokenizer N takes such a vocabulary)
        vocabs.append((vocab, tokenizer))
    vocabulary = Vocabulary(mode, base_size, base_size, embeddings, source=base)
    if mode == "union":
        _union(vocabulary, base_tokenizer, base_vocab, vocabs, experts)
    elif mode != "base":
        _take_expert(vocabulary, int(mode) - 1, base_vocab, vocabs, experts)
    _check_sizes(vocabulary, base, full, experts, warnings)
    if vocabulary.computed:
        _check_rows(vocabulary, base, full)
    _plan_template(vocabulary, options, base, experts, warnings)
    if base_vocab is not None:
        _check_template_tokens(vocabulary, base_vocab, vocabs, warnings)
    return vocabulary, warnings


def _vocab_tensors(base: Checkpoint, architecture) -> tuple[str, ...]:
    """The base's input-embedding weight first, then the output head's and any tied copy present in the file."""
    names = [m + ".weight" for m in (architecture.input_embeddings, architecture.output_head) if m]
    names = [n for n in names if n in base.tensors]
    tied = [n for n, first in architecture.tied.items() if first in names and n in base.tensors]
    if not names or base.tensors[names[0]].shape[0] != base.tensors[names[-1]].shape[0]:
        return ()
    return tuple(dict.fromkeys(names + tied))


def has_tokenizer(folder: Path) -> bool:
    return any(p.is_file() for pattern in TOKENIZER_PATTERNS for p in folder.glob(pattern))


def load_tokenizer(checkpoint: Checkpoint, required: bool):
    """The checkpoint's tokenizer through transformers' AutoTokenizer (never running the folder's code); None,
    or InputError when required, if it has none or it cannot be read."""
    if not has_tokenizer(checkpoint.path):
        if required:
            raise InputError(f"{checkpoint.ref}: has no tokenizer files (needed by --tokenizer)")
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer files lack, say it in one line
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if required:
            raise InputError(f"{checkpoint.ref}: its tokenizer cannot be read ({why})") from e
        log.warning("%s: its tokenizer cannot be read (%s); vocabularies not compared", checkpoint.ref, why)
        return None
    finally:
        transformers_logging.set_verbosity(verbosity)


def _differs(expert, vocab: dict, base, base_vocab: dict, options, warnings: list[str]) -> bool:
    """Whether the expert's vocabulary is not the base's or an extension of it: refused unless accepted."""
    moved = [t for t, i in base_vocab.items() if vocab.get(t) != i]
    if not moved:
        return False
    token = min(moved, key=lambda t: base_vocab[t])
    where = f"id {vocab[token]}" if token in vocab else "missing"
    what = (
        f"its tokenizer's vocabulary is not the base's: {len(moved)} of the base's {len(base_vocab)} tokens differ "
        f"(e.g. {token!r}: {where}, id {base_vocab[token]} in {base.ref})"
    )
    if not options.allow_vocab_mismatch:
        raise InputError(f"{expert.ref}: {what}; pass --allow-vocab-mismatch to accept it")
    warnings.append(f"{expert.ref}: {what}; accepted (--allow-vocab-mismatch): its tokens are matched by string")
    return True


def _added(tokenizer, content: str):
    """The AddedToken to add for `content`: the expert's own flags when it is one of its added tokens."""
    from tokenizers import AddedToken

    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if token.content == content:
            return token
    return AddedToken(content, special=False)


def _union(vocabulary: Vocabulary, base_tokenizer, base_vocab: dict, vocabs, experts) -> None:
    """The base's tokenizer plus every token an expert has and the base lacks, in the order of the experts and
    of their ids."""
    found: dict[str, list[tuple[int, int]]] = {}
    for index, (vocab, _) in enumerate(vocabs):
        for content, token_id in sorted((vocab or {}).items(), key=lambda kv: kv[1]):
            if content not in base_vocab:
                found.setdefault(content, []).append((index, token_id))
    vocabulary.notes += _ignored(vocabs, experts)
    if not found:
        vocabulary.notes.append("no expert adds tokens: the base's tokenizer")
        return
    for content, sources in found.items():
        flags = _added(vocabs[sources[0][0]][1], content)
        base_tokenizer.add_tokens([flags], special_tokens=bool(getattr(flags, "special", False)))
    new = []
    for content, sources in found.items():
        token_id = base_tokenizer.convert_tokens_to_ids(content)
        if not isinstance(token_id, int) or token_id in base_vocab.values():
            raise SmileError(f"adding token {content!r} to the base's tokenizer gave id {token_id!r}")
        new.append(NewToken(content, token_id, tuple(sources)))
    vocabulary.new_tokens = new
    vocabulary.tokenizer, vocabulary.source = base_tokenizer, None
    vocabulary.size = max(vocabulary.base_size, len(base_tokenizer), max(t.id for t in new) + 1)
    vocabulary.notes += _renumbered(new, experts)


def _take_expert(vocabulary: Vocabulary, chosen: int, base_vocab: dict, vocabs, experts) -> None:
    """Expert `chosen`'s tokenizer as it is: base tokens keep the base's rows (matched by string), its other
    tokens get the rows of the experts that define them."""
    vocab, tokenizer = vocabs[chosen]
    vocabulary.source = experts[chosen].checkpoint
    size = max(vocabulary.base_size, len(tokenizer), max(vocab.values()) + 1)
    base_rows = [i if i < vocabulary.base_size else -1 for i in range(size)]
    new = []
    for content, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        if content in base_vocab:
            base_rows[token_id] = base_vocab[content]
            continue
        base_rows[token_id] = -1
        sources = [(chosen, token_id)]
        sources += [(i, v[content]) for i, (v, _) in enumerate(vocabs) if i != chosen and v and content in v]
        new.append(NewToken(content, token_id, tuple(sorted(sources))))
    vocabulary.new_tokens, vocabulary.size = new, size
    if base_rows != list(range(vocabulary.base_size)) + [-1] * (size - vocabulary.base_size):
        vocabulary.base_rows = base_rows
    vocabulary.notes += _ignored(vocabs, experts) + _renumbered(new, experts)


def _ignored(vocabs, experts) -> list[str]:
    return [
        f"{experts[i].ref}: its tokenizer is not an extension of the base's; its tokens are not added"
        for i, (vocab, tokenizer) in enumerate(vocabs)
        if tokenizer is not None and vocab is None
    ]


def _renumbered(new: list[NewToken], experts) -> list[str]:
    """Tokens whose id in the output is not the id an expert gives them (the rows follow the string)."""
    notes = []
    for token in new:
        other = [(i, token_id) for i, token_id in token.sources if token_id != token.id]
        if other:
            where = ", ".join(f"{token_id} in {experts[i].ref}" for i, token_id in other)
            notes.append(f"token {token.content!r} is id {token.id} in the output ({where})")
    return notes


def _check_sizes(vocabulary: Vocabulary, base, full, experts, warnings: list[str]) -> None:
    """Experts with more embedding rows than the output: the rows past it are not taken (the base's are kept)."""
    if not vocabulary.tensors:
        return
    for expert in full:
        info = expert.tensors.get(vocabulary.tensors[0]) if expert else None
        if expert is None or info is None:
            continue
        if expert.config.get("vocab_size") != base.config.get("vocab_size") and vocabulary.mode == "base":
            warnings.append(
                f"{expert.ref}: vocabulary of {expert.config.get('vocab_size')} tokens against the base's "
                f"{base.config.get('vocab_size')}; embeddings and lm_head come from the base "
                "(--tokenizer union adds its tokens)"
            )
        elif info.shape[0] > vocabulary.size and vocabulary.mode != "base":
            warnings.append(
                f"{expert.ref}: {info.shape[0]} embedding rows, the output has {vocabulary.size}: rows past its "
                "tokenizer's tokens are not taken"
            )


def _expert_tensor(vocabulary: Vocabulary, expert: Checkpoint, name: str) -> str | None:
    """The expert's tensor holding the rows of base tensor `name`: the same name, or its input embeddings for
    an output head the expert ties to them (or lacks, saved from the bare model class)."""
    if name in expert.tensors:
        return name
    embeddings = vocabulary.tensors[0]
    if name != embeddings and embeddings in expert.tensors and expert.config.get("tie_word_embeddings", False):
        return embeddings
    return None


def _check_rows(vocabulary: Vocabulary, base: Checkpoint, full) -> None:
    """Every new token's rows exist in the experts that define it (no id past the end of an embedding)."""
    if not vocabulary.tensors:
        raise InputError(f"{base.ref}: no input embeddings found to extend for --tokenizer {vocabulary.mode}")
    if vocabulary.base_rows is None and vocabulary.size < vocabulary.base_size:
        raise SmileError("the output vocabulary is smaller than the base's")
    for name in vocabulary.tensors:
        width = base.tensors[name].shape[1:]
        for token in vocabulary.new_tokens:
            for index, token_id in token.sources:
                expert = full[index]
                source = _expert_tensor(vocabulary, expert, name)
                if source is None:
                    raise InputError(f"{expert.ref}: tensor '{name}' is missing (needed for token {token.content!r})")
                info = expert.tensors[source]
                if info.shape[1:] != width or not info.dtype.is_floating_point:
                    raise InputError(
                        f"{expert.ref}: tensor '{source}' has shape {list(info.shape)} or dtype unlike the base's"
                    )
                if token_id >= info.shape[0]:
                    raise InputError(
                        f"{expert.ref}: token {token.content!r} has id {token_id}, past the end of '{source}' "
                        f"({info.shape[0]} rows)"
                    )


def vocab_tensor(plan, name: str, base_tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Base tensor `name` with its rows following the output's vocabulary: base rows where the token is the
    base's, else the mean (in float32) of the rows of the experts that define the token."""
    vocabulary = plan.vocabulary
    out = torch.zeros((vocabulary.size, *base_tensor.shape[1:]), dtype=dtype)
    if vocabulary.base_rows is None:
        count = min(vocabulary.size, vocabulary.base_size)
        out[:count] = base_tensor[:count].to(dtype)
    else:
        rows = torch.tensor(vocabulary.base_rows)
        kept = (rows >= 0).nonzero().flatten()
        out[kept] = base_tensor[rows[kept]].to(dtype)
    for token in vocabulary.new_tokens:
        total = None
        for index, token_id in token.sources:
            expert = plan.experts[index].checkpoint
            row = read_row(expert, _expert_tensor(vocabulary, expert, name), token_id).float()
            total = row if total is None else total + row
        out[token.id] = (total / len(token.sources)).to(dtype)
    return out


def read_row(checkpoint: Checkpoint, name: str, row: int) -> torch.Tensor:
    """Row `row` of a 2-D (or more) tensor, reading only its bytes (a whole pickle tensor is loaded anyway)."""
    if isinstance(checkpoint, PickleCheckpoint):
        tensor = checkpoint.read(name)[row].clone()
    else:
        tensor = read_tensor(checkpoint.ref, checkpoint.tensors, name, row=row)
    if not torch.isfinite(tensor.float()).all():
        raise InputError(f"{checkpoint.ref}: row {row} of tensor '{name}' holds NaN or Inf values")
    return tensor


def read_chat_template(folder: Path) -> str | list | None:
    """A folder's chat template, where transformers looks: chat_template.jinja, chat_template.json, then the
    `chat_template` of tokenizer_config.json (a string, or a list of named templates)."""
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text()
        for name in ("chat_template.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                template = load_json(folder / name).get("chat_template")
                if template:
                    return template
    except (*JSON_ERRORS, AttributeError) as e:
        raise InputError(f"{folder}: its chat template cannot be read ({e})") from e
    return None


def _plan_template(vocabulary: Vocabulary, options, base, experts, warnings: list[str]) -> None:
    """--chat-template: auto (the base's; else the one the experts that have one share; else none), base, N,
    or a file's text. Kept as the tokenizer source's own files when it is that source's template."""
    choice = options.chat_template
    source = vocabulary.source
    if choice in ("auto", "base"):
        template, origin = read_chat_template(base.path), "the base's"
        if template is None and choice == "auto":
            found = [(i, t) for i, e in enumerate(experts) if (t := read_chat_template(e.path)) is not None]
            distinct = {json.dumps(t) for _, t in found}
            if len(distinct) == 1:
                template = found[0][1]
                origin = f"shared by the expert(s) that have one: {', '.join(experts[i].ref for i, _ in found)}"
            elif distinct:
                warnings.append(
                    f"the experts have {len(distinct)} different chat templates and the base none: the output has "
                    "none (choose one with --chat-template N or FILE)"
                )
        if template is None:
            origin = "none (no input has one)" if choice == "auto" else "none (the base has none)"
    elif choice.isdigit():
        index = int(choice) - 1
        if not 0 <= index < len(experts):
            raise InputError(f"--chat-template {choice}: there are {len(experts)} experts (give 1 to {len(experts)})")
        template, origin = read_chat_template(experts[index].path), f"{experts[index].ref}'s (expert {choice})"
        if template is None:
            raise InputError(f"--chat-template {choice}: {experts[index].ref} has no chat template")
    else:
        path = Path(choice).expanduser()
        try:
            template, origin = path.read_text(), f"the file {path.name}"
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(
                f"--chat-template {choice}: not auto, base, an expert number or a readable file ({e})"
            ) from e
    vocabulary.template, vocabulary.template_origin = template, origin
    vocabulary.template_kept = source is not None and json.dumps(template) == json.dumps(
        read_chat_template(source.path)
    )


def _check_template_tokens(vocabulary: Vocabulary, base_vocab: dict, vocabs, warnings: list[str]) -> None:
    """A template that writes tokens an expert added and the output's tokenizer lacks would split them."""
    if not isinstance(vocabulary.template, str):
        return
    if vocabulary.mode in ("base", "union"):
        output = set(base_vocab) | {t.content for t in vocabulary.new_tokens}
    else:
        output = set(vocabs[int(vocabulary.mode) - 1][0])
    missing = sorted(
        {t for vocab, _ in vocabs for t in vocab or () if t not in output and t.strip() and t in vocabulary.template}
    )
    if missing:
        warnings.append(
            f"the chat template ({vocabulary.template_origin}) writes tokens the output's tokenizer lacks "
            f"({', '.join(missing[:3])}): pass --tokenizer union to add them"
        )


def write_tokenizer(plan, folder: Path) -> None:
    """The output's tokenizer files (copied from the source, or saved from the union's tokenizer) and its chat
    template (rewritten unless it is the source's own)."""
    vocabulary = plan.vocabulary
    if vocabulary.source is not None:
        for path in sorted(_files(vocabulary.source.path, TOKENIZER_PATTERNS + TEMPLATE_FILES)):
            shutil.copyfile(path, folder / path.name)
    else:
        vocabulary.tokenizer.save_pretrained(folder)
        for name in TEMPLATE_FILES:  # save_pretrained writes the base's template: set below as chosen
            (folder / name).unlink(missing_ok=True)
    if vocabulary.template_kept and vocabulary.source is not None:
        return
    for name in TEMPLATE_FILES:
        (folder / name).unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = load_json(config_path) if config_path.is_file() else None  # save_pretrained's, just written
    if config is not None:
        config.pop("chat_template", None)
    if isinstance(vocabulary.template, str):
        (folder / "chat_template.jinja").write_text(vocabulary.template)
    elif vocabulary.template is not None:  # named templates: where transformers also reads them
        config = config if config is not None else {}
        config["chat_template"] = vocabulary.template
    if config is not None:
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _files(folder: Path, patterns) -> set[Path]:
    return {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}


def config_fields(plan) -> dict:
    """config.json fields the vocabulary sets: vocab_size, and the token ids of an expert's tokenizer."""
    vocabulary = plan.vocabulary
    fields = {"vocab_size": vocabulary.size} if vocabulary.computed and "vocab_size" in plan.base.config else {}
    source = vocabulary.source
    if source is not None and source is not plan.base:
        fields.update({k: source.config[k] for k in TOKEN_ID_FIELDS if k in source.config})
    return fields
