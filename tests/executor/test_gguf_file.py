"""tgi-mp's fast GGUF index against gguf's own reader, on the bundled model."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader

from tgi_mp.gguf_file import SMALL_ARRAY, GGUFFile
from tgi_mp.model_source import resolve_model


def test_the_index_is_ggufs_own() -> None:
    path = resolve_model(None).gguf_path
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.shape, b.shape), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data, b.data), a.name
    skipped = 0
    for key, field in theirs.fields.items():
        value = field.contents()
        if key.startswith("GGUF."):  # the header's own numbers
            continue
        if isinstance(value, list) and len(value) > SMALL_ARRAY:  # the vocabulary
            assert key not in ours.fields
            skipped += 1
            continue
        assert ours.fields[key] == value, key
    assert skipped >= 1  # the tokens list is the big one
