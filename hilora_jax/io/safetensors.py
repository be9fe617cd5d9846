"""Torch-free safetensors reading and writing (NumPy, memory-mapped, bf16 via ml_dtypes).

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) so that
bf16 checkpoints read without torch, tensors are read one at a time with a positioned read into a
fresh buffer (streaming into device memory: no memory map, whose touched pages would stay in the
process's resident set, and no second copy of the file), and a truncated or corrupt file fails
with an error naming the file and tensor instead of a low-level exception.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from hilora_jax._fs import atomic_file
from hilora_jax.errors import HiloraUserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_FLOAT_EXT = {np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
              np.dtype(ml_dtypes.float8_e5m2)}


class CheckpointError(HiloraUserError, ValueError):
    """A checkpoint file is malformed, incomplete or inconsistent with the model."""


class SafetensorsFile(Mapping):
    """Read-only mapping `name -> np.ndarray` over one `.safetensors` file.

    Only the header is read up front; each `st[name]` reads that tensor's bytes into a new array
    owned by the caller (freed with it), so a loader holds one tensor at a time on the host.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: file too short to be safetensors")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise CheckpointError(f"{self.path}: header length {n} exceeds file size {size}")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: unreadable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._offset = 8 + n
        data_len = size - self._offset
        for name, info in header.items():
            if info.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{info.get('dtype')!r}")
            start, end = info["data_offsets"]
            want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
            if end > data_len or end - start != want:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} is truncated or inconsistent "
                    f"(offsets {start}..{end}, data section {data_len} bytes, expected {want} bytes)"
                )

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._header[name]
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], np.dtype(_DTYPES[info["dtype"]]))
        if end == start:
            return out
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset + start)
                while got < end - start:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from e
        if got != end - start:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated (read {got} of "
                                  f"{end - start} bytes)")
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def all_finite(arr: np.ndarray, chunk: int = 1 << 24) -> bool:
    """No NaN/inf in `arr`, checked in its own dtype (bf16 included) in chunks of `chunk`
    elements, so no float32 copy and at most `chunk` bytes of temporaries."""
    if not np.issubdtype(arr.dtype, np.inexact) and arr.dtype not in _FLOAT_EXT:
        return True
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel(order="K")
    if flat.dtype == ml_dtypes.bfloat16:  # NaN/inf <=> all 8 exponent bits set (native ops)
        bits = flat.view(np.uint16)
        return all(((bits[i : i + chunk] & 0x7F80) != 0x7F80).all()
                   for i in range(0, bits.size, chunk))
    return all(np.isfinite(flat[i : i + chunk]).all() for i in range(0, flat.size, chunk))


def place_tensor(arr: np.ndarray, dtype, sharding=None):
    """Put a host tensor onto device(s) in `dtype`. With a `Sharding`, device by device: copy
    that device's slice (cast to `dtype`), `device_put` it, wait, drop the copy, next device;
    so the host memory beyond `arr` and the device buffers is one shard at a time
    (`jax.make_array_from_callback` would materialise every shard first). Without, one cast
    copy on the default device."""
    import jax
    import jax.numpy as jnp

    dtype = np.dtype(dtype)
    if sharding is None:
        return jnp.asarray(np.asarray(arr, dtype))
    shards = []
    for dev, idx in sharding.addressable_devices_indices_map(arr.shape).items():
        # order "K": a plain copy in the source layout (a transposed torch weight is F-ordered);
        # device_put lays it out, far faster than a NumPy transposing copy of bf16
        host = np.array(arr[idx], dtype=dtype, order="K", copy=True)
        shards.append(jax.block_until_ready(jax.device_put(host, dev)))
        del host
    return jax.make_array_from_single_device_arrays(arr.shape, sharding, shards)


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a HF model directory (single file or sharded with an index)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
        files = sorted({d / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
        return files
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{d}: no model.safetensors, index, or *.safetensors files found")


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        a = np.ascontiguousarray(np.asarray(arr))
        if a.dtype not in _NAMES:
            raise CheckpointError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(a.tobytes())
