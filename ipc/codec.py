"""msgpack encoding of `ipc.messages` with numpy arrays as zero-copy frames.

A message travels as a list of frames: frame 0 is the msgpack header; each
numpy array of at least `INLINE_LIMIT` bytes goes in a frame of its own, and
the header holds only (dtype, shape, frame index). ZeroMQ sends those frames
without copying them, and the reader wraps the received frame buffers with
`np.frombuffer`, so a long prompt is never copied by the codec. Small arrays
are inlined, where an extra frame would cost more than the copy.

On a channel with a shared-memory ring (`ipc.shm`: the step plan's broadcast),
arrays of at least `SHM_MIN_BYTES` are instead copied once into the message's
slot of the ring, and the header holds (dtype, shape, sequence, offset): one
write however many executors read it. What does not fit in the slot travels as
frames, as without a ring.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from tgi_mp.ipc.shm import ALIGN, RingReader, RingWriter

INLINE_LIMIT = 512  # bytes; below this an array is cheaper inline than as a frame
# From here on an array is cheaper written once into the ring than sent as a frame
# (perf/bench_plan_transport.py measures the crossover; RESULTS.md has the table).
SHM_MIN_BYTES = 64 << 10

_EXT_INLINE = 1
_EXT_FRAME = 2
_EXT_SHM = 3

Frames = list[bytes | memoryview]


class Encoder:
    def __init__(self, ring: RingWriter | None = None, shm_min: int | None = None) -> None:
        self._frames: Frames = []
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._ring = ring
        self._shm_min = SHM_MIN_BYTES if shm_min is None else shm_min
        self._slot: tuple[int, int] | None = None  # (seq, offset) of this message's slot
        self._used = 0  # bytes of the slot taken so far

    def encode(self, msg: msgspec.Struct) -> Frames:
        self._frames = [b""]
        self._slot, self._used = None, 0
        self._frames[0] = self._enc.encode(msg)  # the hook appends array frames meanwhile
        frames, self._frames = self._frames, []
        return frames

    def _to_ring(self, arr: np.ndarray, meta: tuple) -> msgspec.msgpack.Ext | None:
        ring = self._ring.ring
        start = -(-self._used // ALIGN) * ALIGN
        if start + arr.nbytes > ring.spec.slot_size:
            return None  # the slot is full: this one goes as a frame
        if self._slot is None:
            self._slot = self._ring.acquire()  # may wait for readers to release it
        seq, base = self._slot
        offset = base + start
        ring.data[offset : offset + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        self._used = start + arr.nbytes
        return msgspec.msgpack.Ext(_EXT_SHM, self._enc.encode((*meta, seq, offset)))

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:  # its bytes would be pointers, meaningless to the reader
                raise NotImplementedError("cannot encode an array of Python objects")
            arr = np.ascontiguousarray(obj)
            meta = (arr.dtype.str, obj.shape)  # not arr's: ascontiguousarray makes 0-d 1-d
            if arr.nbytes < INLINE_LIMIT:
                return msgspec.msgpack.Ext(_EXT_INLINE, self._enc.encode((*meta, arr.tobytes())))
            ring = self._ring is not None and arr.nbytes >= self._shm_min
            if ring and (ext := self._to_ring(arr, meta)) is not None:
                return ext
            self._frames.append(memoryview(arr).cast("B"))
            return msgspec.msgpack.Ext(_EXT_FRAME, self._enc.encode((*meta, len(self._frames) - 1)))
        if isinstance(obj, np.generic):
            return obj.item()
        raise NotImplementedError(f"cannot encode {type(obj).__name__} on an IPC channel")


class Decoder:
    """Decodes one tagged union; arrays are read-only views of the received frames."""

    def __init__(self, msg_type: Any, ring: RingReader | None = None) -> None:
        self._frames: list[Any] = []
        self.ring = ring
        self._meta = msgspec.msgpack.Decoder(tuple)
        self._dec = msgspec.msgpack.Decoder(
            msg_type, ext_hook=self._ext_hook, dec_hook=self._dec_hook
        )

    def decode(self, frames: list[Any]) -> Any:
        self._frames = frames
        try:
            return self._dec.decode(frames[0])
        finally:
            self._frames = []

    def _ext_hook(self, code: int, data: memoryview) -> np.ndarray:
        if code == _EXT_SHM:
            dtype, shape, seq, offset = self._meta.decode(data)
            if self.ring is None:
                raise ValueError("a shared-memory array on a channel without the ring")
            self.ring.saw(seq)
            return self.ring.ring.view(np.dtype(dtype), tuple(shape), offset)
        dtype, shape, payload = self._meta.decode(data)
        if code == _EXT_INLINE:
            buf = payload
        elif code == _EXT_FRAME:
            frame = self._frames[payload]
            buf = frame.buffer if hasattr(frame, "buffer") else frame
        else:
            raise ValueError(f"unknown msgpack extension {code}")
        arr = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
        # ZeroMQ frame buffers are writable, and an inproc frame may be the sender's own
        # array: read-only keeps a reader from writing into someone else's memory.
        arr.flags.writeable = False
        return arr

    @staticmethod
    def _dec_hook(type_: type, obj: Any) -> Any:
        if type_ is np.ndarray:
            if isinstance(obj, np.ndarray):
                return obj
            return np.asarray(obj)
        raise NotImplementedError(f"cannot decode {type_}")
