"""Errors a cache can raise. Each message names the file and says what to do."""

from __future__ import annotations


class CacheError(Exception):
    """Base class for every problem with a teacher cache."""


class CacheNotFoundError(CacheError):
    """The path holds no cache (no manifest)."""


class CacheVersionError(CacheError):
    """The cache was written in a format version this reader does not know."""


class CacheCorruptError(CacheError):
    """A shard or manifest is truncated, altered or inconsistent."""


class CacheMismatchError(CacheError):
    """A cache was made with other settings than the ones asked for."""


class CacheLockedError(CacheError):
    """Another live writer holds the same worker slot."""
