"""The on-disk cache of converted models (in `disk_memo.cache_dir()`): content hashes, atomic publication.

Converted models are cached (keyed by the sha256 of model.bin) so that only the first load pays
for the conversion; every entry carries a manifest of its files' sizes and hashes, written last,
so that an interrupted or corrupted write is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ..disk_memo import cache_dir, read_memo, remember  # noqa: F401 (cache_dir: imported from here by loading and recipes)

logger = logging.getLogger(__name__)

MANIFEST = "crosswhisper-manifest.json"


# --------------------------------------------------------------------------------------------
# Hashing (memoised by path, size, mtime and inode: in the process, and on disk across
# processes, since hashing tiny.en's files took 0.17 s of a 3 s command line run)
# --------------------------------------------------------------------------------------------

_SHA_MEMO: dict[str, str] = {}
_SHA_MEMO_FILE = "hashes.json"  # in cache_dir(): {"path|size|mtime_ns|inode": sha256}
_SHA_MEMO_LIMIT = 256  # entries kept on disk (the newest)


def sha256_file(path: Path) -> str:
    """The file's sha256, computed again only when its path, size, mtime or inode changed
    (a rewrite or truncation changes the size or the mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    digest = _SHA_MEMO.get(key)
    if digest is None:
        digest = read_memo(_SHA_MEMO_FILE).get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
        digest = hasher.hexdigest()
        remember(_SHA_MEMO_FILE, key, digest, limit=_SHA_MEMO_LIMIT)
    _SHA_MEMO[key] = digest
    return digest


def publish_dir(tmp: Path, target: Path, *, is_valid: Callable[[], bool]) -> None:
    """Move a finished directory into place atomically; a concurrent writer may have won."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if target.exists() and is_valid():
            return  # another process published the same content first: use theirs
    # The existing target is stale or broken: move it aside (atomic), then publish ours.
    discard_dir(target)
    os.rename(tmp, target)


def discard_dir(directory: Path) -> None:
    trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def load_cache_entry(entry: Path, load: Callable[[str], object]) -> Optional[object]:
    """The entry loaded by `load(directory)` if its files match the manifest; else None (and the
    broken entry removed, so that the caller rebuilds it)."""
    if not entry.exists():
        return None
    problem = _verify_manifest(entry)
    if problem is None:
        try:
            return load(str(entry))
        except Exception as error:  # any failure to load means the entry cannot be trusted
            problem = f"loading failed: {type(error).__name__}: {error}"
    logger.warning("cached model %s is unusable (%s); rebuilding it", entry, problem)
    discard_dir(entry)
    return None


def _verify_manifest(entry: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest missing or unreadable"
    try:
        present = {p.name for p in entry.iterdir() if p.name != MANIFEST}
        if present != set(expected):
            return f"files differ from the manifest: {sorted(present ^ set(expected))}"
        for filename, info in expected.items():
            path = entry / filename
            if path.stat().st_size != info["size"]:
                return f"{filename} has the wrong size"
            if sha256_file(path) != info["sha256"]:
                return f"{filename} has the wrong sha256"
    except OSError as error:  # e.g. a file removed by a concurrent rebuild
        return f"unreadable: {error}"
    return None


def write_cache_entry(entry: Path, parts, *, source: Path, weights_sha: str, converter_version: int) -> None:
    """Save `parts` (model, tokenizer, generation config, feature extractor) as a cache entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(entry.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        parts.model.save_pretrained(tmp)
        parts.tokenizer.save_pretrained(tmp)
        parts.generation_config.save_pretrained(tmp)
        parts.feature_extractor.save_pretrained(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
        }
        manifest = {
            "converter_version": converter_version,
            "source": str(source),
            "source_model_bin_sha256": weights_sha,
            "files": files,
        }
        # The manifest is written last: an entry without one is an unfinished write.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        publish_dir(tmp, entry, is_valid=lambda: _verify_manifest(entry) is None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp_dirs(parent: Path, max_age_s: float = 24 * 3600) -> None:
    # Leftovers of writers that crashed; a day is far longer than any conversion takes.
    now = time.time()
    for leftover in parent.glob(".tmp-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
