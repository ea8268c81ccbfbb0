"""Every byte of a Hub input checked against the sha256 its repository publishes (LFS), in whatever order the run
reads tensors.

The LFS sha256 covers a whole file, and is computed in file order, while the plan reads tensors in its own order.
So each file keeps a hash cursor (FileCheck): a read that starts at the cursor feeds the file's hash; a read past
the cursor first streams the gap (hashing it, and recording each tensor's own sha256 on the way); a read behind
the cursor is checked against the sha256 recorded for that tensor. When the cursor reaches the end of the file its
hash must equal the published one; after the last step, every file is read to its end. A tensor used before its
file is complete is reported if its file then fails, and the run fails (exit 1) naming the file and the tensor;
the staging folder is deleted. For --resume, the sha256 of every tensor used so far is saved in staging at each
output shard (hub_session.HubSession), and a file verified by an earlier attempt is not hashed again.
"""

from __future__ import annotations

import hashlib
import threading

import torch

from smile_cli.errors import SmileError
from smile_cli.inputs.safetensors_format import TensorInfo

HEADER = "(header)"  # the pseudo-tensor of a file's first bytes: length prefix and JSON header


class IntegrityError(SmileError):
    """Bytes read from the Hub do not match the published sha256 of their file: exit 1, no output."""


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
        """Take up what an earlier attempt left (HubSession)."""
        if state.get("sha256") != self.expected:
            return
        if state.get("verified") and state.get("digests"):
            self.digests, self.verified, self.cursor = dict(state["digests"]), True, self.size
        self.earlier = {k: v for k, v in (state.get("used") or {}).items() if k != HEADER}
        for name, digest in self.earlier.items():
            if self.verified and self.digests.get(name) != digest:
                raise IntegrityError(f"{self.label}: tensor '{name}' used by an earlier attempt differs from the Hub's")
