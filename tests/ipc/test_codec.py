"""Every IPC message through `Encoder`/`Decoder`, and where its arrays travel."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq

from tests.ipc.plans import random_plan
from tgi_mp.ipc import messages as m
from tgi_mp.ipc.channels import Channel
from tgi_mp.ipc.codec import INLINE_LIMIT, Decoder, Encoder

UNIONS = [
    m.FrontendMessage,
    m.SchedulerToFrontend,
    m.SchedulerToExecutor,
    m.ExecutorToScheduler,
    m.SupervisorMessage,
    m.SupervisorEvent,
]
rng = np.random.default_rng(0)


def ints(n: int, dtype: Any = np.int32) -> np.ndarray:
    return rng.integers(-(2**30), 2**30, n).astype(dtype)


def step_plan(b: int, tokens: int) -> m.StepPlan:
    return random_plan(rng, b, tokens)


SAMPLES: list[msgspec.Struct] = [
    m.AddRequest(
        3,
        ints(5000),  # a long prompt: a frame
        m.SamplingParams(7, 0.5, 40, 0.9, True, 123, True, (2, 3)),
    ),
    m.AddRequest(4, ints(3), m.SamplingParams()),
    m.AbortRequest([1, 2, 3]),
    m.GetStats(),
    m.TokenBatch(
        ints(4, np.int64), ints(4), np.linspace(-3, 0, 4, dtype=np.float32), [(1, 2)], [(1, 17)]
    ),
    m.Error(-1, "engine went away", "engine"),
    m.SchedulerStats(1, 2, 3, 4, 5, 6, 7, 8, 0.25, 0.5, 0.75, 1.0),
    step_plan(4, 9),
    step_plan(600, 5000),  # every column large enough for a frame (bool: 600 bytes)
    m.StepMask(7, ints(2 * 1536).reshape(2, 1536)),
    m.Shutdown("bye"),
    m.ExecutorReady(1, 1000, 16, "torch", "float32", "cpu", 512),
    m.StepResult(9, ints(200), 0.125),
    m.StepResult(9, ints(200), 0.125, np.zeros(200, dtype=np.float32)),
    m.StepResult(
        9,
        ints(3),
        0.1,
        np.zeros(3, dtype=np.float32),
        ints(15).reshape(3, 5),
        np.ones((3, 5), dtype=np.float32),
    ),
    m.TokenBatch(
        ints(2, np.int64),
        ints(2),
        np.zeros(2, dtype=np.float32),
        [],
        [],
        ints(6).reshape(2, 3),
        np.ones((2, 3), dtype=np.float32),
    ),
    m.ExecutorFailed(2, "CUDA error: out of memory"),
    m.EngineDead("executor 1 died (SIGKILL)"),
    m.ShuttingDown("The server is shutting down"),
    m.SchedulerReady(1000, 16, 16000, "triton", "bfloat16", "cuda:0", 4096),
]


def union_of(msg: msgspec.Struct) -> Any:
    return next(u for u in UNIONS if type(msg) in typing.get_args(u))


def arrays_of(msg: msgspec.Struct) -> Iterator[np.ndarray]:
    """Every array of a message, in its column groups too."""
    for name in msg.__struct_fields__:
        value = getattr(msg, name)
        if isinstance(value, np.ndarray):
            yield value
        elif isinstance(value, msgspec.Struct):
            yield from arrays_of(value)


def assert_same(a: msgspec.Struct, b: msgspec.Struct) -> None:
    assert type(a) is type(b)
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, msgspec.Struct):
            assert_same(x, y)
        elif isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray), name
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x, y), name
        else:
            assert x == y, name


def test_samples_cover_every_message() -> None:
    tagged = {
        cls
        for _, cls in inspect.getmembers(m, inspect.isclass)
        if issubclass(cls, msgspec.Struct) and cls.__struct_config__.tag
    }
    assert {type(s) for s in SAMPLES} == tagged
    assert tagged == {t for u in UNIONS for t in typing.get_args(u)}  # each in a union


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    frames = Encoder().encode(msg)
    big = [a for a in arrays_of(msg) if a.nbytes >= INLINE_LIMIT]
    assert len(frames) == 1 + len(big)
    # As received off a socket: separate bytes objects, not the sender's memory.
    received = [bytes(f) for f in frames]
    out = Decoder(union_of(msg)).decode(received)
    assert_same(msg, out)
    for arr in arrays_of(out):
        assert not arr.flags.writeable


def test_large_arrays_are_views_of_their_frames() -> None:
    plan = step_plan(600, 5000)
    frames = [bytes(f) for f in Encoder().encode(plan)]
    out = Decoder(m.SchedulerToExecutor).decode(frames)
    by_frame = [np.frombuffer(f, np.uint8) for f in frames[1:]]
    for arr in arrays_of(out):
        owners = [i for i, f in enumerate(by_frame) if np.shares_memory(arr, f)]
        assert len(owners) == 1 and by_frame[owners[0]].nbytes == arr.nbytes  # no copy
    assert len(frames) == 1 + len(list(arrays_of(plan)))  # every array its own frame


def test_inline_limit_boundary() -> None:
    enc, dec = Encoder(), Decoder(m.ExecutorToScheduler)
    small = ints(INLINE_LIMIT // 4 - 1)
    large = ints(INLINE_LIMIT // 4)
    assert small.nbytes < INLINE_LIMIT <= large.nbytes
    frames = enc.encode(m.StepResult(1, small, 0.0))
    assert len(frames) == 1
    assert np.array_equal(dec.decode(frames).token_ids, small)
    frames = enc.encode(m.StepResult(1, large, 0.0))
    assert len(frames) == 2 and bytes(frames[1]) == large.tobytes()
    assert len(enc.encode(m.StepResult(1, small, 0.0))) == 1  # no frames left from before


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros(0, np.int32),
        np.array(5, np.int64),  # 0-d
        np.arange(24, dtype=np.float16).reshape(2, 3, 4),
        np.arange(600, dtype=">i4"),  # byte order is kept, not silently swapped
        np.arange(4000, dtype=np.int64).reshape(40, 100)[:, ::3],  # not contiguous
        np.ones(1000, dtype=bool),
    ],
    ids=["empty", "0d", "3d", "big-endian", "strided", "bool"],
)
def test_array_shapes_and_dtypes(arr: np.ndarray) -> None:
    out = Decoder(m.ExecutorToScheduler).decode(Encoder().encode(m.StepResult(1, arr, 0.0)))
    assert out.token_ids.dtype == arr.dtype and out.token_ids.shape == arr.shape
    assert np.array_equal(out.token_ids, arr)


def test_zero_copy_through_zmq() -> None:
    """The real receive path: pyzmq frames, whose buffers the arrays must view."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-test")
        b.connect("inproc://codec-test")
        tx, rx = Channel(a), Channel(b, m.ExecutorToScheduler)
        sent = ints(1 << 16)
        tx.send(m.StepResult(5, sent, 1.5))
        frames = b.recv_multipart(copy=False)
        out = rx.decode(frames)
        assert out.step_id == 5 and np.array_equal(out.token_ids, sent)
        assert np.shares_memory(out.token_ids, np.frombuffer(frames[1].buffer, np.uint8))
        # inproc may hand over the sender's own buffer: the reader must not write into it
        with pytest.raises(ValueError, match="read-only"):
            out.token_ids[0] = 1
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_list_for_an_array_field() -> None:
    """A peer without the codec may send a plain msgpack list where an array is expected."""
    header = msgspec.msgpack.encode(["StepResult", 1, [1, 2, 3], 0.0])
    out = Decoder(m.ExecutorToScheduler).decode([header])
    assert isinstance(out.token_ids, np.ndarray) and out.token_ids.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "msg",
    [
        m.Shutdown(reason=object()),  # type: ignore[arg-type]
        m.Error(1, types.SimpleNamespace()),  # type: ignore[arg-type]
        m.StepResult(1, np.array([object(), object()]), 0.0),  # pointers are not data
    ],
    ids=["object", "namespace", "object-array"],
)
def test_unknown_types_raise(msg: msgspec.Struct) -> None:
    enc = Encoder()
    with pytest.raises(NotImplementedError, match="cannot encode"):
        enc.encode(msg)
    assert len(enc.encode(m.StepResult(1, ints(1000), 0.0))) == 2  # the encoder still works


def test_decode_errors() -> None:
    dec = Decoder(m.ExecutorToScheduler)
    bad_ext = msgspec.msgpack.Ext(9, msgspec.msgpack.encode(("<i4", (3,), 0)))
    with pytest.raises(ValueError, match="unknown msgpack extension 9"):
        dec.decode([msgspec.msgpack.encode(["StepResult", 1, bad_ext, 0.0])])
    with pytest.raises(msgspec.ValidationError):  # a message of another channel
        dec.decode(Encoder().encode(m.Shutdown("x")))
    assert dec.decode(Encoder().encode(m.ExecutorFailed(0, "x"))) == m.ExecutorFailed(0, "x")
