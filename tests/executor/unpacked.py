"""Runners whose float32 linears stay `F.linear` modules (not packed for oneDNN), for
tests that scale a model's weights in place after it is built."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from tgi_mp.executor import packed


@contextmanager
def float32_unpacked() -> Iterator[None]:
    with mock.patch.object(packed, "onednn_float32_faster", lambda: False):
        yield
