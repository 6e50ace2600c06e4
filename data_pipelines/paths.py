"""Local and remote data paths: local files through the os, `gs://`, `s3://`, `az://`
and `hf://` through etils.epath, any other `protocol://` (memory://, file://,
http(s)://, ...) through fsspec. Every data source opens its files here."""
from __future__ import annotations

EPATH_PROTOCOLS = ("gs://", "s3://", "az://", "hf://")


def _protocol(path: str) -> str:
    head, sep, _ = path.partition("://")
    return head + sep if sep else ""


def open_binary(path: str):
    """A binary, seekable file object for a local or remote path."""
    protocol = _protocol(path)
    if not protocol:
        return open(path, "rb")
    if protocol in EPATH_PROTOCOLS:
        from etils import epath

        return epath.Path(path).open("rb")
    import fsspec

    return fsspec.open(path, "rb").open()


def open_binary_write(path: str):
    """A binary file object writing `path`, local or remote (parents created)."""
    protocol = _protocol(path)
    if not protocol:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, "wb")
    if protocol in EPATH_PROTOCOLS:
        from etils import epath

        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("wb")
    import fsspec

    return fsspec.open(path, "wb", auto_mkdir=True).open()


def exists(path: str) -> bool:
    """Whether `path` opens for reading (local or remote)."""
    try:
        open_binary(path).close()
    except (OSError, ValueError):
        return False
    return True


def is_remote(path: str) -> bool:
    return bool(_protocol(path))


def expand(patterns: str) -> list[str]:
    """Sorted paths matching a glob, or several comma-separated globs (each must
    match something: a typo is an error, not an empty source)."""
    paths: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        found = _glob(pattern)
        if not found:
            raise FileNotFoundError(f"no files match {pattern!r}")
        paths += found
    if not paths:
        raise FileNotFoundError(f"no file pattern in {patterns!r}")
    return sorted(dict.fromkeys(paths))


def _glob(pattern: str) -> list[str]:
    protocol = _protocol(pattern)
    if not protocol:
        import glob

        return sorted(glob.glob(pattern))
    if protocol in EPATH_PROTOCOLS:
        from etils import epath

        # epath globs below a directory: split at the first component with a wildcard.
        parts = pattern[len(protocol):].split("/")
        first = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")),
                     len(parts))
        root = epath.Path(protocol + "/".join(parts[:first]))
        if first == len(parts):
            return [str(root)] if root.exists() else []
        return sorted(str(p) for p in root.glob("/".join(parts[first:])))
    import fsspec

    fs, _ = fsspec.core.url_to_fs(pattern)
    return sorted(protocol + p.split("://", 1)[-1].lstrip("/") if protocol == "memory://"
                  else fs.unstrip_protocol(p) for p in fs.glob(pattern))


def shard_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
