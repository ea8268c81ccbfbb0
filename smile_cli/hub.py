"""Hub inputs read without a local copy: plan from remote headers, stream tensors, verify every byte.

A Hub id `org/name[@revision]` is pinned to a commit hash when it is opened (`HfApi.model_info`, which also gives
each file's size and LFS sha256). config.json, the safetensors index, tokenizer and chat-template files and the
model card are fetched (kilobytes to a few MB, into the usual Hugging Face cache: the plan checks vocabularies);
each safetensors file's header is read with two HTTP range requests. That is all a plan and
`--dry-run` transfer. Tensors are then read as the plan uses them, by mode (`--inputs`):

- stream: range requests to `resolve/<commit>/<file>`; nothing of the weights is written to disk;
- download: each weight file is downloaded into the cache first (hf_hub_download), then read from there;
- auto: files already in the local cache are read from it, the others streamed.

All HTTP goes through huggingface_hub (`hf_hub_url`, `build_hf_headers`, `http_stream_backoff` on its shared
client): the user's token, HF_ENDPOINT, HF_HUB_DOWNLOAD_TIMEOUT and client factory (proxies) apply. Requests that
fail before the body (connection errors, timeouts, 429/5xx) are retried with backoff by huggingface_hub; a body cut
short is resumed from the first missing byte. 401/403/404 exit 2 in one line.

Integrity: the LFS sha256 covers a whole file, and is computed in file order, while the plan reads tensors in its
own order. So each file keeps a hash cursor (FileCheck): a read that starts at the cursor feeds the file's hash;
a read past the cursor first streams the gap (hashing it, and recording each tensor's own sha256 on the way); a
read behind the cursor is checked against the sha256 recorded for that tensor. When the cursor reaches the end of
the file its hash must equal the published one; after the last step, every file is read to its end. A tensor used
before its file is complete is reported if its file then fails, and the run fails (exit 1) naming the file and the
tensor; the staging folder is deleted. For --resume, the sha256 of every tensor used so far is saved in staging at
each output shard (Verification), and a file verified by an earlier attempt is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch

from smile_cli.errors import InputError, SmileError
from smile_cli.sources import (
    HUB_ALLOW_PATTERNS,
    Checkpoint,
    TensorInfo,
    _check_index,
    _offline,
    _read_index,
    header_length,
    is_hub_ref,
    open_checkpoint,
    parse_safetensors_header,
    read_config,
    refuse_quantized,
    repository_error,
)
from smile_cli.writer import write_json

log = logging.getLogger("smile")
INPUT_MODES = ("stream", "download", "auto")
CHUNK = 2**20
HEADER = "(header)"  # the pseudo-tensor of a file's first bytes: length prefix and JSON header
VERIFY_STATE = ".smile-hub-digests.json"


class IntegrityError(SmileError):
    """Bytes read from the Hub do not match the published sha256 of their file: exit 1, no output."""


def _retries() -> int:
    return int(os.environ.get("SMILE_HUB_RETRIES", "5"))


def _retry_wait() -> float:
    return float(os.environ.get("SMILE_HUB_RETRY_WAIT", "1"))


# ----------------------------------------------------------------------------------------------- reading bytes


class LocalSource:
    """A file in the local Hugging Face cache."""

    def __init__(self, path: Path):
        self.path = path

    def stream(self, begin: int, end: int, sink) -> None:
        with open(self.path, "rb") as f:
            f.seek(begin)
            position = begin
            while position < end:
                chunk = f.read(min(CHUNK * 8, end - position))
                if not chunk:
                    raise IntegrityError(f"{self.path}: shorter than the Hub says (ends at byte {position})")
                sink(memoryview(chunk))
                position += len(chunk)


class RemoteSource:
    """A file on the Hub at a pinned commit, read with HTTP range requests through huggingface_hub's client."""

    def __init__(self, repo_id: str, filename: str, commit: str, label: str):
        from huggingface_hub import hf_hub_url

        self.url = hf_hub_url(repo_id, filename, revision=commit)
        self.commit, self.label = commit, label

    def stream(self, begin: int, end: int, sink) -> None:
        """Hand bytes [begin, end) to sink in order, each once; a cut connection is resumed at the missing byte."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, http_stream_backoff

        position, failures = begin, 0
        while position < end:
            headers = {**build_hf_headers(), "Range": f"bytes={position}-{end - 1}", "Accept-Encoding": "identity"}
            error = None
            try:
                with http_stream_backoff(  # retries failed requests (connection, timeout, 429, 5xx) itself
                    "GET",
                    self.url,
                    headers=headers,
                    timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                    follow_redirects=True,
                    max_retries=_retries(),
                    base_wait_time=_retry_wait(),
                ) as response:
                    self._check_response(response, position)
                    try:  # a body cut short is resumed here, from the first missing byte (not inside the backoff)
                        for chunk in response.iter_bytes():  # as received: a cut loses nothing handed over
                            take = min(len(chunk), end - position)
                            sink(memoryview(chunk)[:take])
                            position += take
                            failures = 0
                            if position >= end:
                                break
                    except httpx2.TransportError as e:
                        error = e
            except httpx2.TransportError as e:
                error = e
            if position < end:
                failures += 1
                if failures > _retries():
                    raise SmileError(f"{self.label}: cannot read bytes {position}-{end} from the Hub: {error}")
                wait = min(_retry_wait() * 2 ** (failures - 1), 8)
                why = str(error) if error else "the response ended early"
                log.warning("%s: %s at byte %d; resuming in %.1f s", self.label, why, position, wait)
                time.sleep(wait)

    def _check_response(self, response, position: int) -> None:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub.utils import hf_raise_for_status

        status = response.status_code
        if status in (401, 403):
            raise InputError(f"{self.label}: access refused by the Hub ({status}: gated or private; log in)")
        if status == 404:
            raise InputError(f"{self.label}: not found on the Hub (404)")
        if status >= 400:
            response.read()
            try:
                hf_raise_for_status(response)
            except hub_errors.HfHubHTTPError as e:
                raise SmileError(f"{self.label}: the Hub answered {status}: {str(e).splitlines()[0]}") from e
        commit = response.headers.get("X-Repo-Commit")
        if commit and commit != self.commit:
            raise IntegrityError(f"{self.label}: the Hub served commit {commit}, not the pinned {self.commit}")
        served = response.headers.get("Content-Range", "")
        if status != 206 or not served.startswith(f"bytes {position}-"):
            raise SmileError(f"{self.label}: the Hub ignored a range request (status {status}, {served or 'no range'})")


# ------------------------------------------------------------------------------------------ verifying bytes


class FileCheck:
    """One Hub file's bytes as the run uses them, checked against its published sha256 (see the module doc)."""

    def __init__(self, label: str, size: int, sha256: str, source):
        self.label, self.size, self.expected, self.source = label, size, sha256, source
        self.entries: list[tuple[int, int, str]] = []  # (begin, end, name) of the tensors, in file order
        self.cursor = 0  # every byte before it is in the file's hash
        self.hasher = hashlib.sha256()
        self.digests: dict[str, str] = {}  # per tensor, from the file-order pass
        self.used: dict[str, str] = {}  # per tensor, of the bytes the run used (for a later --resume)
        self.earlier: dict[str, str] = {}  # used by an earlier attempt, checked when the pass reaches them
        self.verified = False
        self.lock = threading.Lock()
        self._next = 0  # index of the first entry not yet passed
        self._partial = None  # hasher of the entry the cursor is inside

    def set_layout(self, tensors: list[TensorInfo]) -> None:
        self.entries = sorted((t.begin, t.end, t.name) for t in tensors)

    def header_bytes(self, end: int) -> bytes:
        """Bytes from the cursor to end (the start of the file: length prefix, header), fed to the file's hash."""
        data = bytearray()
        with self.lock:
            self._advance(end, data.extend)
        return bytes(data)

    def read(self, info: TensorInfo) -> torch.Tensor:
        """Tensor info's bytes as a uint8 tensor, checked as far as its file has been hashed."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if not info.nbytes:
            return buffer
        view = memoryview(buffer.numpy()).cast("B")
        filled = 0
        digest = hashlib.sha256()

        def into(chunk):
            nonlocal filled
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)

        def into_hashed(chunk):
            into(chunk)
            digest.update(chunk)

        with self.lock:
            if info.begin >= self.cursor and not self.verified:
                self._advance(info.begin)  # the gap: hashed, and dropped
                self._advance(info.end, into, tensor=info.name)
                self.used[info.name] = self.digests[info.name]
                return buffer
            self.source.stream(info.begin, info.end, into_hashed)
            self.used[info.name] = digest.hexdigest()
            if self.digests.get(info.name) != self.used[info.name]:
                raise IntegrityError(
                    f"{self.label}: tensor '{info.name}' read again differs from the bytes hashed for the Hub's sha256"
                )
            return buffer

    def finish(self) -> None:
        """Read (and hash) what the run did not, to the end of the file, and compare with the published sha256."""
        with self.lock:
            if not self.verified:
                self._advance(self.size)

    def _advance(self, target: int, sink=None, tensor: str | None = None) -> None:
        """Move the cursor to target, hashing every byte in between (handed to sink too, when given)."""
        if target <= self.cursor:
            return

        def consume(chunk: memoryview) -> None:
            self.hasher.update(chunk)
            done = 0
            while done < len(chunk):
                entry = self._entry_at(self.cursor)
                if entry is None:  # header bytes
                    following = self.entries[self._next][0] if self._next < len(self.entries) else self.size
                    take = min(len(chunk) - done, following - self.cursor)
                else:
                    take = min(len(chunk) - done, entry[1] - self.cursor)
                    self._partial = self._partial or hashlib.sha256()
                    self._partial.update(chunk[done : done + take])
                    if self.cursor + take == entry[1]:
                        self._close_entry(entry[2])
                self.cursor += take
                done += take
            if sink is not None:
                sink(chunk)

        self.source.stream(self.cursor, target, consume)
        if self.cursor == self.size:
            self._verify(tensor)

    def _entry_at(self, position: int) -> tuple[int, int, str] | None:
        while self._next < len(self.entries) and self.entries[self._next][1] <= position:
            begin, end, name = self.entries[self._next]
            if begin == end:  # an empty tensor
                self.digests.setdefault(name, hashlib.sha256().hexdigest())
            self._next += 1
        if self._next < len(self.entries) and self.entries[self._next][0] <= position:
            return self.entries[self._next]
        return None

    def _close_entry(self, name: str) -> None:
        digest = self._partial.hexdigest()
        self._partial = None
        self.digests[name] = digest
        if name in self.earlier and self.earlier[name] != digest:
            raise IntegrityError(
                f"{self.label}: tensor '{name}' used by an earlier attempt differs from the Hub's file (run again "
                "without --resume)"
            )

    def _verify(self, tensor: str | None) -> None:
        got = self.hasher.hexdigest()
        if got != self.expected:
            if tensor:
                where = f"detected reading tensor '{tensor}' (every tensor of this file is suspect)"
            else:
                used = sorted(self.used)
                named = ", ".join(f"'{n}'" for n in used[:3]) + (f" and {len(used) - 3} more" if len(used) > 3 else "")
                where = f"tensors used from it: {named}"
            raise IntegrityError(
                f"{self.label}: sha256 {got[:16]}... differs from the Hub's {self.expected[:16]}... (corrupted in "
                f"transit or at the source); {where}"
            )
        self.verified = True

    def state(self) -> dict:
        with self.lock:  # (the read-ahead thread adds to used)
            return {
                "sha256": self.expected,
                "verified": self.verified,
                "digests": dict(self.digests) if self.verified else {},
                "used": {**self.earlier, **self.used},
            }

    def restore(self, state: dict) -> None:
        """Take up what an earlier attempt left (Verification.load)."""
        if state.get("sha256") != self.expected:
            return
        if state.get("verified") and state.get("digests"):
            self.digests, self.verified, self.cursor = dict(state["digests"]), True, self.size
        self.earlier = {k: v for k, v in (state.get("used") or {}).items() if k != HEADER}
        for name, digest in self.earlier.items():
            if self.verified and self.digests.get(name) != digest:
                raise IntegrityError(f"{self.label}: tensor '{name}' used by an earlier attempt differs from the Hub's")


# ------------------------------------------------------------------------------------------- the checkpoint


@dataclass
class HubCheckpoint(Checkpoint):
    """A Hub model at a pinned commit whose weight files are read through FileCheck (remote or cached)."""

    repo_id: str = ""
    mode: str = "auto"
    checks: dict[str, FileCheck] = field(default_factory=dict)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.ref}: tensor '{name}' is missing")
        return self.checks[info.file.name].read(info).view(info.dtype).reshape(info.shape)

    def fingerprint(self) -> dict:
        config = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        files = [{"name": n, "size": c.size, "sha256": c.expected} for n, c in self.checks.items()]
        return {"ref": self.ref, "revision": self.revision, "config_sha256": config, "files": files}

    def streamed_bytes(self) -> int:
        return sum(c.size for c in self.checks.values() if isinstance(c.source, RemoteSource))

    def fetch(self) -> None:
        """Before a run in download mode: download the weight files not in the cache, then read them there."""
        from huggingface_hub import hf_hub_download

        for name, check in self.checks.items():
            if self.mode == "download" and isinstance(check.source, RemoteSource):
                path = _hub_call(self.ref, hf_hub_download, self.repo_id, name, revision=self.revision)
                check.source = LocalSource(Path(path))


def open_input(ref: str, *, inputs: str = "auto", allow_pickle: bool = False, trust_remote_code: bool = False):
    """A full checkpoint: a Hub id, when online, planned from its remote headers and read as `inputs` says; anything
    else (a local folder, a Hub id offline or with pickle weights only) through sources.open_checkpoint."""
    if is_hub_ref(ref) and not _offline():
        checkpoint = open_hub_checkpoint(ref, inputs, trust_remote_code=trust_remote_code)
        if checkpoint is not None:  # None: pickle weights, downloaded and read locally
            return checkpoint
    return open_checkpoint(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def open_hub_checkpoint(ref: str, mode: str, *, trust_remote_code: bool = False) -> HubCheckpoint | None:
    """Pin ref's revision, fetch config.json and the index, read each safetensors header by range requests.

    Returns None for a LoRA adapter or a repository with only pickle weights: those are downloaded (sources.py).
    """
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    if mode not in INPUT_MODES:
        raise InputError(f"--inputs {mode!r}: use one of {', '.join(INPUT_MODES)}")
    repo_id, _, revision = ref.partition("@")
    info = _hub_call(ref, HfApi().model_info, repo_id, revision=revision or None, files_metadata=True)
    commit = info.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    if "adapter_config.json" in siblings and "config.json" not in siblings:
        return None
    if "config.json" not in siblings:
        raise InputError(f"{ref}: no config.json in the repository at {commit}")
    names = _weight_names(ref, repo_id, commit, siblings)
    if names is None:
        return None
    # config.json, tokenizer and chat-template files, the model card: small, read by the plan (vocab.py)
    folder = Path(_hub_call(ref, hf_hub_download, repo_id, "config.json", revision=commit)).parent
    for name in sorted(n for n in siblings if _small_file(n) and n != "config.json"):
        _hub_call(ref, hf_hub_download, repo_id, name, revision=commit)
    config, warnings = read_config(ref, folder, trust_remote_code)
    checkpoint = HubCheckpoint(
        ref, folder, config, {}, commit, [folder / n for n in names], warnings, repo_id=repo_id, mode=mode
    )
    for name in names:
        sibling = siblings[name]
        sha = sibling.lfs.sha256 if sibling.lfs else None
        if not sha or sibling.size is None:
            raise InputError(f"{ref}: {name} has no published LFS sha256 on the Hub; cannot verify it")
        label = f"{repo_id}@{commit[:12]}/{name}"
        cached = try_to_load_from_cache(repo_id, name, revision=commit) if mode != "stream" else None
        source = LocalSource(Path(cached)) if isinstance(cached, str) else RemoteSource(repo_id, name, commit, label)
        check = FileCheck(label, sibling.size, sha, source)
        path = folder / name
        prefix = check.header_bytes(8)  # two range requests: the length, then exactly the header
        raw = check.header_bytes(8 + header_length(path, prefix, sibling.size))
        tensors, _ = parse_safetensors_header(path, raw, sibling.size)
        check.set_layout(list(tensors.values()))
        checkpoint.checks[name] = check
        for tensor_name, tensor_info in tensors.items():
            if tensor_name in checkpoint.tensors:
                other = checkpoint.tensors[tensor_name].file.name
                raise InputError(f"{ref}: tensor '{tensor_name}' appears in both {other} and {name}")
            checkpoint.tensors[tensor_name] = tensor_info
    _check_index(ref, folder, checkpoint.tensors)
    refuse_quantized(ref, config, checkpoint.tensors)
    return checkpoint


def _weight_names(ref: str, repo_id: str, commit: str, siblings: dict) -> list[str] | None:
    """The safetensors files the model's weights are in (index first); None when there are only pickles."""
    from huggingface_hub import hf_hub_download

    if "model.safetensors.index.json" in siblings:
        index = Path(_hub_call(ref, hf_hub_download, repo_id, "model.safetensors.index.json", revision=commit))
        names = sorted(set(_read_index(ref, index).values()))
        for name in names:
            if name not in siblings:
                raise InputError(f"{ref}: shard {name} named in model.safetensors.index.json is missing")
        return names
    if "model.safetensors" in siblings:
        return ["model.safetensors"]
    shards = sorted(n for n in siblings if n.endswith(".safetensors") and "/" not in n)
    if shards:
        return shards
    if any(n.endswith(".bin") or n.endswith(".pt") for n in siblings):
        return None
    raise InputError(f"{ref}: no model.safetensors or model.safetensors.index.json in the repository at {commit}")


def _small_file(name: str) -> bool:
    return not name.endswith(".safetensors") and any(fnmatch(name, p) for p in HUB_ALLOW_PATTERNS)


def _hub_call(ref: str, function, *args, **kwargs):
    """Call huggingface_hub, retrying transient failures (connection errors, timeouts, 429 and 5xx answers) with
    backoff; its errors become one line (exit 2 for a missing repository, revision or file, or refused access;
    exit 1 for the rest)."""
    import httpx2
    from huggingface_hub import errors as hub_errors

    for attempt in range(_retries() + 1):
        try:
            return function(*args, **kwargs)
        except (hub_errors.RevisionNotFoundError, hub_errors.RepositoryNotFoundError) as e:
            raise repository_error(ref, e) from e
        except hub_errors.EntryNotFoundError as e:
            raise InputError(f"{ref}: {args[1] if len(args) > 1 else 'a file'} not found in the repository") from e
        except hub_errors.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise InputError(f"{ref}: access refused by the Hub ({status}: gated or private; log in)") from e
            if status not in (429, 500, 502, 503, 504) or attempt == _retries():
                raise SmileError(f"{ref}: the Hub failed: {str(e).splitlines()[0]}") from e
            error = e
        except (httpx2.TransportError, OSError) as e:
            if attempt == _retries():
                raise SmileError(f"{ref}: cannot reach the Hub: {e}") from e
            error = e
        wait = min(_retry_wait() * 2**attempt, 8)
        log.warning("%s: %s; retrying in %.1f s", ref, str(error).splitlines()[0] if str(error) else error, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------- one run's verification


def checkpoints(plan) -> list[Checkpoint]:
    """The base and the experts' checkpoints (a LoRA expert has its own files: lora.py)."""
    return [plan.base, *(getattr(e, "checkpoint", None) or getattr(e, "adapter", e) for e in plan.experts)]


def hub_inputs(plan) -> list[HubCheckpoint]:
    return [c for c in checkpoints(plan) if isinstance(c, HubCheckpoint)]


class Verification:
    """The FileChecks of one run: what an earlier attempt left is taken up, the sha256 of every tensor used is
    saved in staging at each output shard, and finish() completes every file's check."""

    def __init__(self, plan, staging: Path, resume: bool):
        self.checks = {f"{c.ref}/{n}": f for c in hub_inputs(plan) for n, f in c.checks.items()}
        self.path = staging / VERIFY_STATE
        if resume and self.checks:
            try:
                state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                state = {}
            for key, check in self.checks.items():
                if isinstance(state.get(key), dict):
                    check.restore(state[key])

    def save(self) -> None:
        if not self.checks or not self.path.parent.is_dir():
            return
        write_json(self.path, {key: check.state() for key, check in self.checks.items()})

    def finish(self, keep_state: bool = False) -> None:
        verify_all(self.checks.values())
        if not keep_state:
            self.path.unlink(missing_ok=True)


def verify_all(checks) -> None:
    """Read every Hub file to its end and match it with its published sha256 (IntegrityError otherwise)."""
    for check in checks:
        check.finish()


def prepare(plan, parts: bool) -> None:
    """Before a run (not a dry run): download mode's downloads (HubCheckpoint.fetch)."""
    inputs = hub_inputs(plan)
    if parts and any(c.streamed_bytes() for c in inputs):
        raise InputError(
            "streamed Hub inputs cannot be split with --shard or torchrun (each part would fetch and verify every "
            "file whole); use --inputs download"
        )
    for checkpoint in inputs:
        checkpoint.fetch()


def is_streamed(checkpoint: Checkpoint) -> bool:
    return isinstance(checkpoint, HubCheckpoint) and checkpoint.streamed_bytes() > 0


def not_measured_streamed(plan, experts: list) -> list:
    """The (index, expert) pairs whose kept tensors can be compared with the base's (kept.py) without fetching
    tensor data while planning: none when the base is streamed, else the experts that are not. A warning says
    which were left out (a local copy, or the files in the cache, has them measured)."""
    left = [e for _, e in experts if is_streamed(e)] if not is_streamed(plan.base) else [e for _, e in experts]
    if left:
        plan.warnings.append(
            f"non-upscaled tensors of {', '.join(e.ref for e in left)} not compared with the base's: not in the "
            "local cache, and the plan reads only headers from the Hub"
        )
    return [(i, e) for i, e in experts if e not in left]


def inputs_summary(plan) -> dict:
    """Per input: where it is read from and how many bytes; and the disk each --inputs mode needs."""
    rows, uncached = [], 0
    for checkpoint in checkpoints(plan):
        if isinstance(checkpoint, HubCheckpoint):
            total = sum(c.size for c in checkpoint.checks.values())
            cached = sum(c.size for c in checkpoint.checks.values() if isinstance(c.source, LocalSource))
            uncached += total - cached
            rows.append(
                {
                    "ref": checkpoint.ref,
                    "commit": checkpoint.revision,
                    "mode": checkpoint.mode,
                    "weight_bytes": total,
                    "cached_bytes": cached,
                    "files": len(checkpoint.checks),
                }
            )
        else:
            rows.append({"ref": checkpoint.ref, "mode": "local", "weight_bytes": sum(checkpoint_sizes(checkpoint))})
    out = plan.out_bytes
    disk = {"stream": out, "auto": out, "download": out + uncached}
    return {"inputs": rows, "disk_bytes_by_mode": disk}


def checkpoint_sizes(checkpoint: Checkpoint) -> list[int]:
    return [path.stat().st_size for path in checkpoint.files if path.is_file()]
