"""msgpack encoding of `ipc.messages` with numpy arrays as zero-copy frames.

A message travels as a list of frames: frame 0 is the msgpack header; each
numpy array of at least `INLINE_LIMIT` bytes goes in a frame of its own, and
the header holds only (dtype, shape, frame index). ZeroMQ sends those frames
without copying them, and the reader wraps the received frame buffers with
`np.frombuffer`, so a long prompt is never copied by the codec. Small arrays
are inlined, where an extra frame would cost more than the copy.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

INLINE_LIMIT = 512  # bytes; below this an array is cheaper inline than as a frame

_EXT_INLINE = 1
_EXT_FRAME = 2

Frames = list[bytes | memoryview]


class Encoder:
    def __init__(self) -> None:
        self._frames: Frames = []
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def encode(self, msg: msgspec.Struct) -> Frames:
        self._frames = [b""]
        self._frames[0] = self._enc.encode(msg)  # the hook appends array frames meanwhile
        frames, self._frames = self._frames, []
        return frames

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:  # its bytes would be pointers, meaningless to the reader
                raise NotImplementedError("cannot encode an array of Python objects")
            arr = np.ascontiguousarray(obj)
            meta = (arr.dtype.str, obj.shape)  # not arr's: ascontiguousarray makes 0-d 1-d
            if arr.nbytes < INLINE_LIMIT:
                return msgspec.msgpack.Ext(_EXT_INLINE, self._enc.encode((*meta, arr.tobytes())))
            self._frames.append(memoryview(arr).cast("B"))
            return msgspec.msgpack.Ext(_EXT_FRAME, self._enc.encode((*meta, len(self._frames) - 1)))
        if isinstance(obj, np.generic):
            return obj.item()
        raise NotImplementedError(f"cannot encode {type(obj).__name__} on an IPC channel")


class Decoder:
    """Decodes one tagged union; arrays are read-only views of the received frames."""

    def __init__(self, msg_type: Any) -> None:
        self._frames: list[Any] = []
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
