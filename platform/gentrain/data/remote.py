"""Where shards and index files may live, and how each is opened as a byte stream.

    data.source: /data/imagenet            # local folder (or file:// URL)
    data.source: https://host/imagenet     # streamed with curl, as WebDataset does
    data.source: s3://bucket/imagenet      # fsspec + s3fs: pip install 'gentrain[s3]'
    data.source: gs://bucket/imagenet      # fsspec + gcsfs: pip install 'gentrain[gcs]'

Every stream is read front to back while the tar is walked: nothing is
downloaded whole, and fsspec fetches object storage in blocks. Any other
protocol that fsspec knows (az://, hf://, memory://, ...) goes through fsspec as
well when its package is installed. `pipe:` URLs run a shell command for every
shard; a spec or index from someone else could run anything, so they are
refused unless the spec opts in with `data.allow_pipe: true`.
"""

from __future__ import annotations

import importlib.util
import re

from gentrain.data.errors import MissingExtraError, UnsafeURLError

LOCAL_SCHEMES = ("", "file")
CURL_SCHEMES = ("http", "https")
PIPE_SCHEME = "pipe"
# The extras that pyproject declares for the common object stores; other fsspec
# protocols name their own package in the error.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# Object stores answer in round trips: larger blocks keep a streamed tar from
# paying one request per member.
FSSPEC_BLOCK_SIZE = 8 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(url: str) -> str:
    """'s3' for s3://..., 'pipe' for pipe:..., '' for a local path (which may contain ':')."""
    if url.startswith(PIPE_SCHEME + ":"):
        return PIPE_SCHEME
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def is_remote(url: str) -> bool:
    """True for a URL (joined with '/'), False for a local path (joined with os.path)."""
    return url_scheme(url) != ""


def check_readable(urls, allow_pipe: bool = False) -> None:
    """Raise now, before any reading starts, for a URL this run may not or cannot read."""
    examples: dict[str, str] = {}
    for url in urls:
        examples.setdefault(url_scheme(url), url)
    for scheme, example in sorted(examples.items()):
        if scheme == PIPE_SCHEME:
            if not allow_pipe:
                raise UnsafeURLError(_pipe_refusal(example))
        elif scheme not in LOCAL_SCHEMES + CURL_SCHEMES:
            require_fsspec_backend(scheme, example)


def require_fsspec_backend(scheme: str, example: str) -> None:
    """Raise MissingExtraError (naming the pip extra) when fsspec cannot open `scheme`."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(scheme)
    if known is None:
        raise UnsafeURLError(
            f"{example!r}: gentrain cannot read {scheme}:// URLs; use a local folder, http(s)://, "
            "s3://, gs:// or another protocol that fsspec knows"
        )
    package = known["class"].split(".")[0]
    if importlib.util.find_spec(package) is not None:
        return
    if scheme in EXTRAS:
        raise MissingExtraError(
            f"reading {example!r} needs the optional package {package}, which is not installed: "
            f"pip install 'gentrain[{EXTRAS[scheme]}]'"
        )
    raise MissingExtraError(
        f"reading {example!r} needs the optional package {package} ({known.get('err', 'not installed')}): "
        f"pip install {package}"
    )


def open_stream(url: str, allow_pipe: bool = False):
    """A binary stream of `url`, read sequentially (errors surface on open or on read)."""
    scheme = url_scheme(url)
    if scheme == PIPE_SCHEME and not allow_pipe:
        # Checked at start-up too; this keeps a pipe from running if a caller skipped that.
        raise UnsafeURLError(_pipe_refusal(url))
    if scheme in LOCAL_SCHEMES + CURL_SCHEMES + (PIPE_SCHEME,):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open_with_fsspec(url)


def open_with_fsspec(url: str):
    """Open any fsspec URL for streaming reads; a missing backend names its extra."""
    require_fsspec_backend(url_scheme(url), url)
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(url)
    return filesystem.open(path, "rb", block_size=FSSPEC_BLOCK_SIZE)


def read_text(url: str) -> str:
    """The whole of a small remote text file (index.json) through fsspec."""
    with open_with_fsspec(url) as stream:
        return stream.read().decode("utf-8")


def _pipe_refusal(url: str) -> str:
    shown = url if len(url) <= 80 else url[:77] + "..."
    return (
        f"shard URL {shown!r} is a pipe: URL, which runs a shell command on every worker; gentrain "
        "refuses them unless the spec opts in with `data.allow_pipe: true` (only for data you trust)"
    )
