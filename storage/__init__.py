"""The teacher cache: the only door between stage one (writes) and stage two (reads)."""

from .check import VerifyReport, format_summary, plot_summary, summarize, verify_cache
from .errors import (
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheVersionError,
)
from .fs import CacheDir, get_folder, is_uri, join_uri, put_file, redact
from .manifest import CacheInfo, CacheManifest
from .reader import CacheReader, Cursor, SequenceStream
from .sequence import SequenceTargets
from .shard import FORMAT_VERSION, KINDS, DecodedBlock, Encoding
from .writer import CacheWriter

__all__ = [
    "CacheCorruptError", "CacheDir", "CacheError", "CacheInfo", "CacheLockedError", "CacheManifest", "CacheMismatchError",
    "CacheNotFoundError", "CacheReader", "CacheVersionError", "CacheWriter", "Cursor", "DecodedBlock", "Encoding",
    "FORMAT_VERSION", "KINDS", "SequenceStream", "SequenceTargets", "VerifyReport", "format_summary", "plot_summary",
    "get_folder", "is_uri", "join_uri", "put_file", "redact", "summarize", "verify_cache",
]
