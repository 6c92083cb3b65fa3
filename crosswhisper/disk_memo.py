"""Small facts remembered on disk across processes (model-agnostic): where crosswhisper keeps
its cache, and JSON memos in it (key → value), written whole then renamed, so a reader never
sees half a file; an unreadable or read-only cache is the same as an empty one."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where crosswhisper keeps converted models and memos: $CROSSWHISPER_CACHE, else
    $XDG_CACHE_HOME/crosswhisper, else ~/.cache/crosswhisper."""
    if os.environ.get("CROSSWHISPER_CACHE"):
        return Path(os.environ["CROSSWHISPER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "crosswhisper"
    return Path.home() / ".cache" / "crosswhisper"


def read_memo(name: str) -> dict:
    """The memo `name` in cache_dir() ({} when missing or unreadable)."""
    try:
        memo = json.loads((cache_dir() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def remember(name: str, key: str, value, *, limit: int) -> None:
    """Add key → value to the memo `name`, keeping its newest `limit` entries."""
    memo = read_memo(name)
    memo.pop(key, None)
    memo[key] = value
    memo = dict(list(memo.items())[-limit:])
    target = cache_dir() / name
    try:  # written whole then renamed: a reader never sees half a file
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(memo), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as error:  # a read-only cache: the fact is found again in every process
        logger.debug("could not remember %s in %s: %s", key, target, error)
