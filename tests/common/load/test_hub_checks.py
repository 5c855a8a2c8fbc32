"""What a request's revision and a hub's answers must look like before they name a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.common.errors import InvalidSpec
from service.common.load.hub_checks import (
    CONFIG_MAX_BYTES,
    SMALL_MAX_BYTES,
    check_revision,
    file_name_problem,
    inside,
    is_commit,
    is_etag,
    size_cap,
)
from service.common.load.sources import HubSource, parse_source
from service.serving.files import MAX_FILE_BYTES

SHA1 = "0123456789abcdef0123456789abcdef01234567"
SHA256 = "ab" * 32


@pytest.mark.parametrize(
    "revision",
    ["main", "v1.0", "refs/pr/12", SHA1, "release/2024-01", "feature_x+y", "v1.0-rc.1", "a" * 255],
)
def test_branch_tag_and_commit_names_are_revisions(revision: str) -> None:
    assert check_revision(revision) == revision
    assert parse_source("acme/llama", revision, []) == HubSource("acme/llama", revision)


@pytest.mark.parametrize(
    "revision",
    [
        "..",
        "../x",
        "a/../b",
        "a..b",
        "/main",
        "-main",
        "a//b",
        "main/",
        "main.",
        "x.lock",
        "a/b.lock/c",
        ".hidden",
        "a/.b",
        "@",
        "a@{1}",
        "a b",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[b",
        "a\\b",
        "a" * 256,
    ],
)
def test_what_is_not_a_git_ref_is_refused_invalid_spec(revision: str) -> None:
    with pytest.raises(InvalidSpec, match="revision"):
        check_revision(revision)
    with pytest.raises(InvalidSpec, match="revision"):
        parse_source("acme/llama", revision, [])


def test_an_empty_revision_is_the_default_branch() -> None:
    assert parse_source("acme/llama", "", []) == HubSource("acme/llama", "main")
    with pytest.raises(InvalidSpec, match="empty"):
        check_revision("")


def test_commits_are_40_lowercase_hex() -> None:
    assert is_commit(SHA1)
    for bad in ("", SHA1[:-1], SHA1 + "0", SHA1.upper(), "../" + SHA1[3:], SHA256, "None"):
        assert not is_commit(bad), bad


def test_etags_are_git_blob_ids_or_sha256() -> None:
    assert is_etag(SHA1) and is_etag(SHA256)
    for bad in ("", "../../x", "/etc/passwd", SHA1[:-1], SHA256 + "0", "W/x", "a" * 50):
        assert not is_etag(bad), bad


@pytest.mark.parametrize(
    "name",
    ["config.json", "sub/model.safetensors", "a/b/c.txt", "tokenizer.model", ".gitattributes"],
)
def test_relative_names_inside_the_repo_are_file_names(name: str) -> None:
    assert file_name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../x",
        "a/../../x",
        "a/..",
        ".",
        "./x",
        "a/./b",
        "/etc/passwd",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "C:x",
        "a\x00b",
        "a\nb",
        "a\x7f",
        "x" * 256,
        "/".join(["d"] * 2100),
    ],
)
def test_names_that_leave_the_repo_or_cannot_be_paths_are_refused(name: str) -> None:
    assert file_name_problem(name) is not None


def test_config_like_json_and_small_text_files_are_capped_weights_are_not() -> None:
    assert size_cap("config.json") == CONFIG_MAX_BYTES
    assert size_cap("generation_config.json") == CONFIG_MAX_BYTES
    assert size_cap("sub/config.json") == CONFIG_MAX_BYTES
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model"):
        assert size_cap(name) == SMALL_MAX_BYTES, name
    assert size_cap("model.safetensors.index.json") == SMALL_MAX_BYTES
    for name in ("model.safetensors", "pytorch_model-00001-of-00002.bin", "sample.wav"):
        assert size_cap(name) is None, name
    assert 1 << 20 < CONFIG_MAX_BYTES < SMALL_MAX_BYTES == MAX_FILE_BYTES  # what /files serves


def test_inside_follows_links_and_dot_dots(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (cache / "link").symlink_to(tmp_path / "out")
    assert inside(cache / "blobs" / "x", cache)
    assert inside(cache / "not-yet" / "made", cache)
    assert not inside(cache / "blobs" / ".." / ".." / "out", cache)
    assert not inside(cache / "link" / "x", cache)
    assert not inside(cache, cache / "blobs")
