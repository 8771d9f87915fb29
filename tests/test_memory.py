"""release_memory gives freed heap memory back to the system (what a sweep does between runs)."""

from __future__ import annotations

import ctypes.util
import sys

import psutil
import pytest
import torch

from dpo_align.core.memory import release_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc's malloc_trim")
def test_freed_tensors_leave_the_resident_set_after_release():
    process = psutil.Process()
    # 400 MB in 64 KB tensors (below glibc's mmap threshold: they live in the heap), then all freed but the last,
    # which pins the top of the heap so that free() alone cannot shrink it, as a live model's tensors do
    tensors = [torch.ones(16 * 1024) for _ in range(6400)]
    keep = tensors[-1]
    del tensors
    before = process.memory_info().rss
    release_memory()
    after = process.memory_info().rss
    assert before - after > 200 * 2**20, (before / 2**20, after / 2**20)
    assert keep.sum().item() == 16 * 1024  # what is still in use is untouched
