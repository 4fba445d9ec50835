"""Counts this process's file-system calls: the instrument of benchmarks/data_startup.py and of the
tests that assert how many files data start-up touches (a metadata server shared by thousands of
ranks is the cost being bounded).

Counted while active: ``open`` (builtins and io: every Python-level open, pathlib's included),
``os.stat`` and ``os.lstat`` (so ``os.path.isfile``/``exists`` and pathlib's ``is_file``/``exists``
count once each), ``os.scandir`` and ``os.listdir`` (a listing counts once). Memory-mapped and
C-level opens (DALI's readers) are not seen.
"""
from __future__ import annotations

import builtins
import io
import os

_WRAPPED = (("builtins", builtins, "open"), ("io", io, "open"), ("os", os, "stat"), ("os", os, "lstat"),
            ("os", os, "scandir"), ("os", os, "listdir"))


class FileOps:
    """Counts file-system calls made in this process while active: ``calls`` holds (operation, path)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "FileOps":
        seen = {}
        for _, module, name in _WRAPPED:
            original = getattr(module, name)
            if id(original) not in seen:      # builtins.open is io.open: wrap the object once
                seen[id(original)] = self._wrap(original, "open" if name == "open" else name)
            self._saved.append((module, name, original))
            setattr(module, name, seen[id(original)])
        return self

    def _wrap(self, original, op: str):
        def counted(path=".", *args, **kwargs):
            self.calls.append((op, os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)))
            return original(path, *args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def reset(self) -> list[tuple[str, str]]:
        calls, self.calls = self.calls, []
        return calls
