"""The process's malloc thresholds are pinned (glibc), so large frees go back to the OS."""

from __future__ import annotations

import platform

import pytest

from service.memory import pin_malloc_thresholds


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_malloc_thresholds_are_pinned_on_glibc() -> None:
    assert pin_malloc_thresholds()
