"""What the merge code reads from checkpoints: every tensor that ``telelora.reference`` takes
from a safetensors file, counted per model folder (tensors and bytes), for the merge-cost bench
and the tests that hold the route to one read of each reference."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from telelora import reference


@dataclasses.dataclass
class Reads:
    tensors: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {folder: tensors}
    bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # {folder: bytes}


class _CountingFile:
    """A safetensors file as ``reference`` opens it, adding each tensor read to ``reads``."""

    def __init__(self, reads: Reads, open_file, path, **kwargs):
        self.reads, self.folder, self.file = reads, Path(path).parent, open_file(path, **kwargs)

    def __enter__(self):
        self.handle = self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, name):
        tensor = self.handle.get_tensor(name)
        self.reads.tensors[self.folder] += 1
        self.reads.bytes[self.folder] += tensor.numel() * tensor.element_size()
        return tensor


def counting_open(reads: Reads):
    """A stand-in for ``reference.safe_open`` that counts what is read in ``reads``."""
    real_open = reference.safe_open
    return lambda path, **kwargs: _CountingFile(reads, real_open, path, **kwargs)


@contextlib.contextmanager
def counting_reads() -> Iterator[Reads]:
    """Within the context, every tensor ``telelora.reference`` reads is counted in the yielded ``Reads``."""
    reads = Reads()
    with mock.patch.object(reference, "safe_open", counting_open(reads)):
        yield reads
