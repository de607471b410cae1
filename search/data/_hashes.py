"""Content hashes of a dataset's files: sha256 per file (kept in a per-dataset digest cache, so a
re-scan reads no unchanged file twice), the optional full decode that `verify` asks for, known
placeholder images, and the content fingerprint built from the digests.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from search.config import atomic_write_text, default_cache_dir
from search.data._decode import BadImageError, _load_with_header, _workers
from search.data._index import Sample, _relative

# (width, height, mode, has transparency) of one image file, read from its header.
Header = tuple[int, int, str, bool]

# Bump when the per-file hash cache's layout changes, so old files are not read.
HASH_CACHE_FORMAT = 1


# Placeholders that image hosts serve in place of a deleted photo. Scraped datasets are full of
# them; they decode fine but are not pictures of the class. Matched byte for byte (sha256), so a
# real photo is never caught: size -> {sha256: what it is}.
KNOWN_PLACEHOLDERS: dict[int, dict[str, str]] = {
    5504: {
        "6b4966252973c581b521f804453c6a0649ea6a2ce7e3e5c7deeb7d80623de231":
            "a 'we're sorry, this image could not be found' placeholder, not a photo",
    },
}


def _inspect(
    paths: list[str],
    stats: dict[str, tuple[int, int, int]],
    root: str,
    *,
    verify: bool,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[dict[str, str], dict[str, str], dict[str, Header]]:
    """Hashes every file (sha256 of its bytes) and, with verify, decodes it (JPEGs in draft mode).

    Returns:
        ({path: hex digest}, {path: reason} for the files to skip: unreadable, undecodable, or a
        known placeholder, {path: (width, height, mode, has transparency)} of the decoded files).
    """
    cache_file = _hash_cache_file(root, cache_dir)
    cached = _load_hashes(cache_file)

    def inspect(path: str) -> tuple[str | None, str | None, Header | None]:
        size, mtime_ns, ctime_ns = stats[path]
        entry = cached.get(_rel_key(path, root))
        # A file rewritten in place changes its ctime even when size and mtime are put back.
        digest = entry[3] if isinstance(entry, list) and entry[:3] == [size, mtime_ns, ctime_ns] else None
        if digest is None:
            try:
                digest = _sha256_file(path)
            except OSError as e:
                return None, f"cannot read: {e.strerror or e}", None
        if not verify:
            return digest, None, None
        try:
            _, header = _load_with_header(path, draft=1)  # draft 1: smallest JPEG scale, still reads every byte
        except BadImageError as e:
            return digest, str(e), None
        placeholder = KNOWN_PLACEHOLDERS.get(size, {}).get(digest)
        return digest, placeholder, (header if placeholder is None else None)

    if not paths:
        return {}, {}, {}
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        results = list(pool.map(inspect, paths))
    digests = {p: d for p, (d, _, _) in zip(paths, results) if d is not None}
    bad = {p: r for p, (_, r, _) in zip(paths, results) if r is not None}
    headers = {p: h for p, (_, _, h) in zip(paths, results) if h is not None}
    fresh = {_rel_key(p, root): [*stats[p], d] for p, d in digests.items()}
    if fresh != cached:
        _save_hashes(cache_file, root, fresh)
    return digests, bad, headers


def _duplicate_groups(digests: dict[str, str], keep: set[str]) -> tuple[tuple[str, ...], ...]:
    """Groups (sorted, >= 2 paths) of the files in `keep` whose contents are identical."""
    by_digest: dict[str, list[str]] = {}
    for path in sorted(keep):
        if path in digests:
            by_digest.setdefault(digests[path], []).append(path)
    return tuple(sorted(tuple(g) for g in by_digest.values() if len(g) > 1))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rel_key(path: str, root: str) -> str:
    # "/" on every OS, so a dataset copied between systems keeps its fingerprint.
    return _relative(path, root).replace(os.sep, "/")


def _hash_cache_file(root: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    return folder / "hashes" / f"{key}.v{HASH_CACHE_FORMAT}.json"


def _load_hashes(path: Path) -> dict[str, list[Any]]:
    """{relative path: [size, mtime_ns, ctime_ns, sha256]} from a digest cache; {} when unusable."""
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def _save_hashes(path: Path, root: str, files: dict[str, list[Any]]) -> None:
    try:
        atomic_write_text(path, json.dumps({"root": root, "files": files}))
    except OSError:
        pass  # a cache that cannot be written only costs hashing again next time


def _content_fingerprint(
    root: str, samples: list[Sample], stats: dict[str, tuple[int, int, int]], digests: dict[str, str]
) -> str:
    """sha256[:16] over every file's label, relative path, size and content digest, in path order."""
    h = hashlib.sha256()
    for key, path, label in sorted((_rel_key(p, root), p, y) for p, y in samples):
        h.update(f"{label}\t{key}\t{stats[path][0]}\t{digests[path]}\n".encode())
    return h.hexdigest()[:16]


def _label_file_fingerprint(
    root: str, rows: list[tuple[str, str, str]], stats: dict[str, tuple[int, int, int]], digests: dict[str, str]
) -> str:
    """sha256[:16] over a label file's usable rows: split as the file gives it ("" without a split
    column), class name, relative path, size and content digest, in path order. The labels and
    splits live in the file, not in the paths, so they are hashed as such."""
    h = hashlib.sha256()
    h.update(b"label-file\n")
    for key, path, label, split in sorted((_rel_key(p, root), p, y, s) for p, y, s in rows):
        h.update(f"{split}\t{label}\t{key}\t{stats[path][0]}\t{digests[path]}\n".encode())
    return h.hexdigest()[:16]
