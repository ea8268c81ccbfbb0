"""Bytes of Hub files, and every Hub call, through huggingface_hub with one retry policy.

All HTTP goes through huggingface_hub (`hf_hub_url`, `build_hf_headers`, `http_stream_backoff` on its shared
client): the user's token, HF_ENDPOINT, HF_HUB_DOWNLOAD_TIMEOUT and client factory (proxies) apply. Requests that
fail before the body (connection errors, timeouts, 429/5xx) are retried with backoff by huggingface_hub; a body cut
short is resumed from the first missing byte; an API call that fails transiently is made again. Both wait as
`backoff` says (SMILE_HUB_RETRIES attempts more, waits doubling from SMILE_HUB_RETRY_WAIT seconds up to 8).
401/403/404 exit 2 in one line.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from smile_cli.errors import InputError, SmileError
from smile_cli.inputs.hub_integrity import IntegrityError
from smile_cli.inputs.resolve import repository_error

log = logging.getLogger("smile")
CHUNK = 2**20


def retries() -> int:
    return int(os.environ.get("SMILE_HUB_RETRIES", "5"))


def retry_wait() -> float:
    return float(os.environ.get("SMILE_HUB_RETRY_WAIT", "1"))


def backoff(failures: int, note: str) -> bool:
    """After the `failures`-th failed attempt in a row at one thing: False when the retries are spent (the caller
    raises), else True once `note` ('<what>: <why>; retrying') is logged and the wait is over."""
    if failures > retries():
        return False
    wait = min(retry_wait() * 2 ** (failures - 1), 8)
    log.warning("%s in %.1f s", note, wait)
    time.sleep(wait)
    return True


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
                    max_retries=retries(),
                    base_wait_time=retry_wait(),
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
                why = str(error) if error else "the response ended early"
                if not backoff(failures, f"{self.label}: {why} at byte {position}; resuming"):
                    raise SmileError(f"{self.label}: cannot read bytes {position}-{end} from the Hub: {error}")

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


def hub_call(ref: str, function, *args, **kwargs):
    """Call huggingface_hub, retrying transient failures (connection errors, timeouts, 429 and 5xx answers) as
    `backoff` says; its errors become one line (exit 2 for a missing repository, revision or file, or refused
    access; exit 1 for the rest)."""
    import httpx2
    from huggingface_hub import errors as hub_errors

    failures = 0
    while True:
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
            given_up, error = SmileError(f"{ref}: the Hub failed: {str(e).splitlines()[0]}"), e
            if status not in (429, 500, 502, 503, 504):
                raise given_up from e
        except (httpx2.TransportError, OSError) as e:
            given_up, error = SmileError(f"{ref}: cannot reach the Hub: {e}"), e
        failures += 1
        why = str(error).splitlines()[0] if str(error) else error
        if not backoff(failures, f"{ref}: {why}; retrying"):
            raise given_up from error
