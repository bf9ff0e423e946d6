"""`pecm.index`: the on-disk archive index (DESIGN §4); see docs/index.md.

`ArchiveIndex` stores unit prototypes (masked-out ones zero), pooled vectors, masks and ids in
memory-mappable files plus metadata in sqlite; appends are crash-safe, one writer and many readers
may work at once, and `ArchiveIndex.search` streams the files through the fused `pecm.ops` kernels.
"""

from .archive import ArchiveIndex
from .format import FORMAT_VERSION, IndexCorruptError, IndexLockedError
from .search import search

__all__ = ["ArchiveIndex", "IndexCorruptError", "IndexLockedError", "FORMAT_VERSION", "search"]
