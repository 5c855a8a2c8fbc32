"""`hub_guard`'s arithmetic on single answers (built as httpx answers, no server): how many
body bytes an answer may have, and which HEAD answers huggingface_hub reads. The guard at
work against a hub that lies is in `test_hub_lies`."""

from __future__ import annotations

import httpx2
import pytest

from service.loader.hub_guard import API_MAX_BYTES, Listed, _cap, _final

URL = "http://mirror.test/acme/llama/resolve/0123456789abcdef0123456789abcdef01234567/a.bin"
FILE = Listed("a.bin", 1000)


def answer(
    status: int, method: str = "GET", range_: str | None = None, **headers: str
) -> httpx2.Response:
    request = httpx2.Request(method, URL, headers={"Range": range_} if range_ else {})
    return httpx2.Response(status, headers=headers, request=request)


@pytest.mark.parametrize(
    ("status", "range_", "listed", "cap"),
    [
        (200, None, FILE, 1000),  # the whole file: its listed size
        (200, "bytes=0-99", FILE, 1000),  # a range the server ignored: still the file
        (206, "bytes=0-99", FILE, 100),  # a header read: the range
        (206, "bytes=900-", FILE, 100),  # a resume: what is left of the file
        (206, "bytes=900-1999", FILE, 100),  # a range past the end: what is left
        (206, "bytes=2000-", FILE, 0),
        (206, "bytes=0-99", None, 100),  # an unlisted URL: the range
        (302, None, FILE, API_MAX_BYTES),  # a redirect's or an error's body
        (404, None, None, API_MAX_BYTES),
    ],
)
def test_a_body_may_not_run_past_what_was_listed_or_asked(
    status: int, range_: str | None, listed: Listed | None, cap: int
) -> None:
    assert _cap(answer(status, range_=range_), listed, largest=10)[0] == cap


def test_an_unlisted_whole_body_may_be_as_large_as_the_largest_listed_file() -> None:
    assert _cap(answer(200), None, largest=5 * API_MAX_BYTES)[0] == 5 * API_MAX_BYTES


def test_huggingface_hub_reads_a_head_unless_it_follows_it_on_the_same_host() -> None:
    assert _final(answer(200, "HEAD"))
    assert not _final(answer(307, "HEAD", location="/api/resolve-cache/models/acme/llama/x"))
    assert _final(answer(302, "HEAD", location="https://cdn.test/lfs/abc"))
