"""Voice prompts: the reference's `.pt` files (read without torch and without running pickle code),
saved safetensors voices, WAV/FLAC voices, and the `voices/` folder of a model directory.

MODEL.md §7.3. A `.pt` voice is a `torch.save` zip archive:

    <prefix>/data.pkl       the pickled dict {"embeddings": Tensor, "cache": Tensor}
    <prefix>/data/<key>     one raw little-endian storage per tensor
    <prefix>/byteorder      "little" (absent in old files)
    <prefix>/version        serialization version

`data.pkl` is read by a restricted unpickler: the only globals it resolves are the tensor rebuild
functions, `collections.OrderedDict` and the storage types, each mapped to a numpy construction.
Any other global (`os.system`, `builtins.exec`, ...) makes the file refuse to load before anything
it names can run. Storages are numpy arrays built from the zip entries; bf16 becomes float32.

Voices in any format resolve to one of two objects:

* `VoicePrompt`: replayable embeddings `[N-1, d]` float32 plus the token ring `cache` `[17, 4]`
  int64 (from a `.pt` or a saved `.safetensors`);
* `WavVoice`: 24 kHz mono float32 audio at -24 LUFS, which the engine Mimi-encodes and runs through
  the LM at session start (and can then turn into a `VoicePrompt` to save).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Union

import numpy as np

from .errors import VoiceError

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
VOICE_LUFS = -24.0

#: Suffixes a voice file may have, in lookup preference order for bare voice names: a saved
#: safetensors voice first (instant), then the reference's .pt, then raw audio.
VOICE_SUFFIXES = (".safetensors", ".pt", ".wav", ".flac")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")

# Limits that keep a hostile or broken file from exhausting memory. Real voices are ~0.5 MB.
_MAX_PICKLE_BYTES = 16 << 20
_MAX_STORAGE_BYTES = 1 << 30
_MAX_TGZ_BYTES = 4 << 30
_MAX_TGZ_MEMBERS = 10_000

SAFETENSORS_FORMAT = "parley-voice"
SAFETENSORS_VERSION = "1"


# --------------------------------------------------------------------------------------------
# Voice objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    """A replayable voice prompt (MODEL.md §7.3).

    embeddings: [N-1, d] float32, the summed input embedding of voice steps 1..N-1.
    cache:      [K, C] int64 (K = 17 channels, C = 4 ring slots), the token ring after the voice.
    name:       the voice's name (file stem).
    source:     where it came from (a path, or a description).
    """

    embeddings: np.ndarray
    cache: np.ndarray
    name: str
    source: str

    def __post_init__(self) -> None:
        for arr in (self.embeddings, self.cache):
            arr.setflags(write=False)

    @property
    def num_frames(self) -> int:
        """N, the voice length in frames (one more than the stored embeddings, MODEL.md §7.3)."""
        return int(self.embeddings.shape[0]) + 1

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


@dataclass(frozen=True, eq=False)
class WavVoice:
    """A voice given as audio: 24 kHz mono float32 normalised to -24 LUFS (MODEL.md §7.3 steps 1-2).

    The engine splits it into 1920-sample frames (zero-padding the last), Mimi-encodes them with a
    fresh streaming state and runs one LM step per frame.
    """

    audio: np.ndarray
    name: str
    source: str
    sample_rate: int = field(default=SAMPLE_RATE)

    def __post_init__(self) -> None:
        self.audio.setflags(write=False)

    @property
    def num_frames(self) -> int:
        return -(-int(self.audio.shape[0]) // FRAME_SIZE)


Voice = Union[VoicePrompt, WavVoice]


# --------------------------------------------------------------------------------------------
# Restricted .pt reader
# --------------------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised inside the unpickler for a global that is not on the allow-list."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _Corrupt(Exception):
    """Raised inside the unpickler for structurally wrong content (one sentence, no path)."""


_BF16 = "bfloat16"

# torch storage class name -> numpy dtype (bf16 is read as uint16 and widened to float32).
_STORAGE_DTYPES: dict[str, object] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def raw_dtype(self) -> np.dtype:
        dt = _STORAGE_DTYPES[self.name]
        return np.dtype("<u2") if dt == _BF16 else dt  # type: ignore[return-value]


class _Storage:
    """A storage materialised as a 1-D numpy array (bf16 already widened to float32)."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
    """numpy stand-in for torch._utils._rebuild_tensor(_v2): a strided copy of a storage."""
    if not isinstance(storage, _Storage):
        raise _Corrupt("a tensor does not point at a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise _Corrupt("a tensor has an invalid storage offset")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise _Corrupt("a tensor has an invalid shape or stride")
    if not all(isinstance(v, int) and v >= 0 for v in size + stride):
        raise _Corrupt("a tensor has an invalid shape or stride")
    base = storage.array
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=base.dtype)
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= base.shape[0]:
        raise _Corrupt("a tensor reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        base[storage_offset:],
        shape=size,
        strides=tuple(st * base.itemsize for st in stride),
        writeable=False,
    )
    return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, *metadata) -> np.ndarray:
    return _rebuild_tensor(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages come from the zip, never from code."""

    def __init__(self, data: bytes, load_storage):
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        # Name the refused global as Python 3 spells it (protocol 2 writes `__builtin__.exec`).
        import _compat_pickle

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Corrupt("it references something other than a tensor storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Corrupt("a storage has an unknown type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Corrupt("a storage reference is malformed")
        cached = self._storages.get(key)
        if cached is None:
            cached = _Storage(self._load_storage(key, storage_type, numel))
            self._storages[key] = cached
        return cached


def _pt_prefix(zf: zipfile.ZipFile) -> str:
    prefixes = [n[: -len("data.pkl")] for n in zf.namelist()
                if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) != 1:
        raise _Corrupt("it holds no single `<name>/data.pkl` record")
    return prefixes[0]


def _read_pt(path: Path) -> dict:
    """Open a torch zip checkpoint and return its unpickled top-level object (numpy tensors)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head.startswith(b"PK"):
            raise VoiceError(
                f"Voice file {path} is truncated or corrupt (its zip directory is unreadable); "
                "copy or download it again."
            ) from None
        raise VoiceError(
            f"{path} is not a PyTorch voice file (.pt files are zip archives); give a voice .pt "
            "saved by PersonaPlex, a saved .safetensors voice, or a WAV file."
        ) from None
    with zf:
        prefix = _pt_prefix(zf)
        infos = {i.filename: i for i in zf.infolist()}

        byteorder = "little"
        if prefix + "byteorder" in infos:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise _Corrupt(f"its byte order record is `{byteorder}`")

        pkl_info = infos[prefix + "data.pkl"]
        if pkl_info.file_size > _MAX_PICKLE_BYTES:
            raise _Corrupt("its data.pkl is implausibly large for a voice")
        data = zf.read(pkl_info)

        def load_storage(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _Corrupt(f"storage `{key}` is missing from the archive")
            raw_dtype = storage_type.raw_dtype
            nbytes = numel * raw_dtype.itemsize
            if nbytes > _MAX_STORAGE_BYTES:
                raise _Corrupt(f"storage `{key}` is implausibly large for a voice")
            if info.file_size < nbytes:
                raise _Corrupt(f"storage `{key}` is shorter than its tensor")
            raw = zf.read(info)[:nbytes]
            if len(raw) < nbytes:
                raise _Corrupt(f"storage `{key}` is shorter than its tensor")
            dt = raw_dtype.newbyteorder(">") if byteorder == "big" else raw_dtype
            arr = np.frombuffer(raw, dtype=dt, count=numel).astype(raw_dtype.newbyteorder("="))
            if _STORAGE_DTYPES[storage_type.name] == _BF16:
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            return arr

        return _RestrictedUnpickler(data, load_storage).load()


def _voice_arrays(obj, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validate a loaded {embeddings, cache} mapping and normalise shapes/dtypes."""
    if not isinstance(obj, dict):
        raise VoiceError(
            f"Voice file {path} does not hold a dict of tensors; a PersonaPlex voice holds "
            "`embeddings` and `cache`."
        )
    for key in ("embeddings", "cache"):
        if key not in obj:
            raise VoiceError(
                f"Voice file {path} has no `{key}` tensor; a PersonaPlex voice holds `embeddings` "
                "and `cache` (regenerate it from the voice's WAV file)."
            )
        if not isinstance(obj[key], np.ndarray):
            raise VoiceError(f"Voice file {path}: `{key}` is not a tensor; regenerate the voice file.")
    emb, cache = obj["embeddings"], obj["cache"]

    if emb.ndim < 2 or any(d != 1 for d in emb.shape[1:-1]):
        raise VoiceError(
            f"Voice file {path}: `embeddings` has shape {list(emb.shape)}, expected [N-1, 1, 1, d]; "
            "regenerate the voice file."
        )
    if not np.issubdtype(emb.dtype, np.floating):
        raise VoiceError(
            f"Voice file {path}: `embeddings` has dtype {emb.dtype}, expected floating point; "
            "regenerate the voice file."
        )
    emb = np.ascontiguousarray(emb.reshape(emb.shape[0], emb.shape[-1]), dtype=np.float32)
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise VoiceError(
            f"Voice file {path} holds no voice frames (0 embeddings); make the voice again from a "
            "longer recording."
        )
    if not np.isfinite(emb).all():
        raise VoiceError(
            f"Voice file {path} has NaN or infinite embeddings; regenerate it from its WAV file."
        )

    if cache.ndim == 3 and cache.shape[0] == 1:
        cache = cache[0]
    if cache.ndim != 2 or cache.shape[0] == 0 or cache.shape[1] == 0:
        raise VoiceError(
            f"Voice file {path}: `cache` has shape {list(obj['cache'].shape)}, expected [1, 17, 4]; "
            "regenerate the voice file."
        )
    if not (np.issubdtype(cache.dtype, np.integer) or cache.dtype == np.bool_):
        raise VoiceError(
            f"Voice file {path}: `cache` has dtype {cache.dtype}, expected integers; "
            "regenerate the voice file."
        )
    cache = np.ascontiguousarray(cache, dtype=np.int64)
    return emb, cache


def _check_file(path: Path, what: str = "Voice file") -> None:
    if not path.exists():
        raise VoiceError(f"{what} {path} does not exist; check the path or give a voice name.")
    if path.is_dir():
        raise VoiceError(f"{what} {path} is a directory; give a voice file or a voice name.")
    if path.stat().st_size == 0:
        raise VoiceError(f"{what} {path} is empty (0 bytes); copy or download it again.")


def load_pt_voice(path: Union[str, os.PathLike]) -> VoicePrompt:
    """Read a reference `.pt` voice without torch and without executing any pickled code."""
    path = Path(path)
    _check_file(path)
    try:
        obj = _read_pt(path)
    except VoiceError:
        raise
    except _Refused as exc:
        raise VoiceError(
            f"Voice file {path} refuses to load: it contains code (`{exc.qualname}`), not just "
            "tensors, and could harm this computer; use voice files only from sources you trust, "
            "or make the voice from a WAV file."
        ) from None
    except _Corrupt as exc:
        raise VoiceError(
            f"Voice file {path} is not a valid PersonaPlex voice ({exc}); regenerate it or "
            "download it again."
        ) from None
    except (zipfile.BadZipFile, EOFError, zlib.error, pickle.UnpicklingError, struct.error,
            ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError,
            RecursionError, MemoryError, NotImplementedError) as exc:
        raise VoiceError(
            f"Voice file {path} is truncated or corrupt ({type(exc).__name__}: {exc}); copy or "
            "download it again."
        ) from None
    except OSError as exc:
        raise VoiceError(f"Voice file {path} cannot be read ({exc.strerror or exc}); check its "
                         "permissions.") from None
    emb, cache = _voice_arrays(obj, path)
    return VoicePrompt(embeddings=emb, cache=cache, name=_voice_name(path), source=str(path))


def _voice_name(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


# --------------------------------------------------------------------------------------------
# Saved voices (safetensors)
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"), "BF16": _BF16,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Minimal safetensors reader (bf16 widened to float32), with errors for people."""
    data = path.read_bytes()
    bad = VoiceError(
        f"Voice file {path} is not a valid safetensors file (truncated or corrupt); save the voice "
        "again."
    )
    if len(data) < 8:
        raise bad
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > (100 << 20):
        raise bad
    try:
        header = json.loads(data[8 : 8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    body = memoryview(data)[8 + hlen :]
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            dt = _ST_DTYPES[dtype_name]
            raw_dt = np.dtype("<u2") if dt == _BF16 else dt
            count = int(np.prod(shape, dtype=np.int64))
            if not (0 <= start <= end <= len(body)) or end - start != count * raw_dt.itemsize:
                raise ValueError
            arr = np.frombuffer(body[start:end], dtype=raw_dt, count=count).reshape(shape)
        except (KeyError, TypeError, ValueError):
            raise VoiceError(
                f"Voice file {path}: tensor `{key}` is malformed or has an unsupported dtype; save "
                "the voice again."
            ) from None
        if dt == _BF16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    if not isinstance(meta, dict):
        meta = {}
    return tensors, {str(k): str(v) for k, v in meta.items()}


def load_safetensors_voice(path: Union[str, os.PathLike]) -> VoicePrompt:
    """Read a voice saved by `save_voice` (or any safetensors file with `embeddings` and `cache`)."""
    path = Path(path)
    _check_file(path)
    try:
        tensors, meta = _read_safetensors(path)
    except OSError as exc:
        raise VoiceError(f"Voice file {path} cannot be read ({exc.strerror or exc}); check its "
                         "permissions.") from None
    emb, cache = _voice_arrays(tensors, path)
    name = meta.get("name") or _voice_name(path)
    return VoicePrompt(embeddings=emb, cache=cache, name=name, source=str(path))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a hidden sibling file (default mode, umask applies) renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_voice(voice: VoicePrompt, path: Union[str, os.PathLike]) -> Path:
    """Save a `VoicePrompt` as safetensors {embeddings [N-1,1,1,d] f32, cache [1,K,C] i64} + metadata.

    The tensor shapes are those of the reference `.pt`, so the file is also a drop-in for tools
    that read converted voices. Written atomically (temporary file, then rename).
    """
    from safetensors.numpy import save

    path = Path(path)
    if isinstance(voice, WavVoice):
        raise VoiceError(
            f"Voice `{voice.name}` is still raw audio; run it through the engine's voice prefill "
            "first (that yields the embeddings), then save the result."
        )
    if not isinstance(voice, VoicePrompt):
        raise VoiceError("Only a VoicePrompt (embeddings and cache) can be saved as a voice file.")
    if path.suffix.lower() != ".safetensors":
        raise VoiceError(f"Cannot save voice to {path}: the file name must end in .safetensors.")
    emb = np.ascontiguousarray(voice.embeddings, dtype=np.float32)
    tensors = {
        "embeddings": emb.reshape(emb.shape[0], 1, 1, emb.shape[1]),
        "cache": np.ascontiguousarray(voice.cache, dtype=np.int64)[None],
    }
    meta = {
        "format": SAFETENSORS_FORMAT,
        "version": SAFETENSORS_VERSION,
        "name": voice.name,
        "source": voice.source,
        "num_frames": str(voice.num_frames),
    }
    try:
        _atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as exc:
        raise VoiceError(f"Cannot save voice to {path} ({exc.strerror or exc}); check that the "
                         "folder exists and is writable.") from None
    return path


# --------------------------------------------------------------------------------------------
# WAV / FLAC voices
# --------------------------------------------------------------------------------------------


def load_wav_voice(path: Union[str, os.PathLike]) -> WavVoice:
    """Read an audio voice: resample to 24 kHz, keep the first channel, normalise to -24 LUFS.

    This is the reference's `load_voice_prompt` (MODEL.md §7.3 steps 1-2).
    """
    from .audiofile import read_audio
    from .errors import AudioError
    from .loudness import normalize_loudness

    path = Path(path)
    try:
        audio = read_audio(path, target_sr=SAMPLE_RATE, mono="first")
    except AudioError as exc:
        raise VoiceError(str(exc)) from None
    audio = normalize_loudness(audio, SAMPLE_RATE, VOICE_LUFS)
    return WavVoice(audio=np.ascontiguousarray(audio, dtype=np.float32), name=_voice_name(path),
                    source=str(path))


# --------------------------------------------------------------------------------------------
# Dispatch, lookup by name, voices.tgz
# --------------------------------------------------------------------------------------------


def load_voice_file(path: Union[str, os.PathLike]) -> Voice:
    """Load a voice file by its suffix: .pt, .safetensors, or audio (.wav/.flac/.ogg)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return load_pt_voice(path)
    if suffix == ".safetensors":
        return load_safetensors_voice(path)
    if suffix in AUDIO_SUFFIXES:
        return load_wav_voice(path)
    raise VoiceError(
        f"Voice file {path} has an unknown type `{suffix or '(no suffix)'}`; use a .pt, "
        ".safetensors, .wav or .flac file."
    )


def _looks_like_path(spec: str) -> bool:
    p = Path(spec)
    return (
        p.suffix.lower() in VOICE_SUFFIXES + AUDIO_SUFFIXES
        or "/" in spec
        or (os.sep != "/" and os.sep in spec)
        or spec.startswith("~")
        or p.is_file()
    )


def voice_dirs(model_dir: Union[str, os.PathLike, None],
               search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> list[Path]:
    """The folders searched for bare voice names: `<model_dir>/voices` (unpacked from voices.tgz
    when needed), then `search_dirs` in order."""
    dirs: list[Path] = []
    if model_dir is not None:
        dirs.append(ensure_voices_unpacked(model_dir))
    dirs.extend(Path(d).expanduser() for d in search_dirs)
    return dirs


def _voice_files(folder: Path) -> dict[str, list[Path]]:
    """Lower-cased stem -> voice files in `folder`, in VOICE_SUFFIXES preference order."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return found
    rank = {s: i for i, s in enumerate(VOICE_SUFFIXES)}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in rank:
            found.setdefault(_voice_name(p).lower(), []).append(p)
    for files in found.values():
        files.sort(key=lambda q: rank[q.suffix.lower()])
    return found


def list_voices(model_dir: Union[str, os.PathLike, None] = None,
                search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> list[str]:
    """Sorted names of the voices available by name (model voices, then `search_dirs`)."""
    names: dict[str, str] = {}
    for folder in voice_dirs(model_dir, search_dirs):
        for files in _voice_files(folder).values():
            stem = _voice_name(files[0])
            names.setdefault(stem.lower(), stem)
    return sorted(names.values(), key=str.lower)


def find_voice(name: str, model_dir: Union[str, os.PathLike, None] = None,
               search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> Path:
    """The file of the voice called `name` (case-insensitive); VoiceError listing names if unknown."""
    dirs = voice_dirs(model_dir, search_dirs)
    for folder in dirs:
        files = _voice_files(folder).get(name.lower())
        if files:
            return files[0]
    available = list_voices(model_dir, search_dirs)
    where = ", ".join(str(d) for d in dirs) or "no voice folder (no model directory given)"
    if available:
        raise VoiceError(
            f"Unknown voice `{name}`; available voices: {', '.join(available)} (searched {where})."
        )
    raise VoiceError(
        f"Unknown voice `{name}`: no voices found in {where}; give a path to a .pt, .safetensors "
        "or .wav voice instead."
    )


def load_voice(voice: Union[str, os.PathLike], model_dir: Union[str, os.PathLike, None] = None,
               *, search_dirs: Iterable[Union[str, os.PathLike]] = ()) -> Voice:
    """Resolve a voice given as a file path (.pt/.safetensors/.wav/.flac) or a bare voice name.

    A bare name (e.g. `NATF2`) is looked up case-insensitively in `<model_dir>/voices/` (unpacking
    `voices.tgz` once if needed) and then in `search_dirs`; a saved `.safetensors` wins over a
    `.pt`, which wins over audio.
    """
    spec = os.fspath(voice)
    if not spec.strip():
        raise VoiceError("The voice is empty; give a voice name or a voice file path.")
    if isinstance(voice, os.PathLike) or _looks_like_path(spec):
        path = Path(spec).expanduser()
        _check_file(path)
        return load_voice_file(path)
    return load_voice_file(find_voice(spec, model_dir, search_dirs))


def _safe_member_parts(name: str) -> tuple[str, ...] | None:
    """Split a tar member name into safe relative parts, or None if it escapes the target."""
    if name.startswith("/") or "\\" in name or ":" in name.split("/", 1)[0]:
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def ensure_voices_unpacked(model_dir: Union[str, os.PathLike]) -> Path:
    """Return `<model_dir>/voices`, unpacking `<model_dir>/voices.tgz` into it the first time.

    The archive is extracted safely: regular files only (links inside the archive become copies;
    absolute paths, `..`, links pointing outside and device files are refused), into a temporary
    folder that is renamed into place, so an interrupted unpack never leaves a partial `voices/`.
    """
    model_dir = Path(model_dir).expanduser()
    voices = model_dir / "voices"
    tgz = model_dir / "voices.tgz"
    if voices.is_dir() and (_voice_files(voices) or not tgz.exists()):
        return voices
    if not tgz.exists():
        return voices
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".voices-unpack-", dir=model_dir))
    except OSError as exc:
        raise VoiceError(
            f"Cannot unpack {tgz} into {voices} ({exc.strerror or exc}); make the model directory "
            "writable or unpack voices.tgz there yourself."
        ) from None
    try:
        _extract_tgz(tgz, tmp)
        # An archive of one top folder (e.g. `voices/NATF0.pt`) unpacks that folder's contents.
        entries = [p for p in tmp.iterdir()]
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        if voices.is_dir():
            try:
                voices.rmdir()  # an empty leftover folder
            except OSError:
                pass
        if voices.is_dir():
            # voices/ exists with other files in it (no voices): add the voices next to them.
            for item in root.iterdir():
                if not (voices / item.name).exists():
                    os.replace(item, voices / item.name)
        else:
            try:
                os.rename(root, voices)
            except OSError:
                if not (voices.is_dir() and _voice_files(voices)):  # not a concurrent unpack
                    raise
    except VoiceError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise VoiceError(
            f"Cannot unpack {tgz} ({exc}); it may be truncated, so download the model's voices "
            "again."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return voices


def _extract_tgz(tgz: Path, dest: Path) -> None:
    links: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    total = 0
    with tarfile.open(tgz, "r:*") as tf:
        for count, member in enumerate(tf, start=1):
            if count > _MAX_TGZ_MEMBERS:
                raise VoiceError(f"{tgz} has too many entries to be a voice archive; download the "
                                 "model's voices again.")
            parts = _safe_member_parts(member.name)
            if parts is None:
                raise VoiceError(
                    f"{tgz} contains an unsafe path `{member.name}` that would land outside the "
                    "voices folder; download the model's voices again from a trusted source."
                )
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                total += member.size
                if total > _MAX_TGZ_BYTES:
                    raise VoiceError(f"{tgz} unpacks to more than 4 GiB, too much for voices; "
                                     "download the model's voices again.")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    continue
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
            elif member.issym() or member.islnk():
                # Symlinks are relative to their own folder, hard links to the archive root.
                base = parts[:-1] if member.issym() else ()
                link_parts = _resolve_inside(base, member.linkname)
                if link_parts is None:
                    raise VoiceError(
                        f"{tgz} contains a link `{member.name}` pointing outside the archive "
                        f"(`{member.linkname}`); download the model's voices again from a trusted "
                        "source."
                    )
                links.append((parts, link_parts))
            else:
                raise VoiceError(
                    f"{tgz} contains `{member.name}`, which is neither a file nor a folder; "
                    "download the model's voices again from a trusted source."
                )
    for parts, target_parts in links:
        src = dest.joinpath(*target_parts)
        if src.is_file() and not src.is_symlink():
            dst = dest.joinpath(*parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def _resolve_inside(base: tuple[str, ...], linkname: str) -> tuple[str, ...] | None:
    """Resolve a link target relative to `base`; None if it is absolute or climbs out."""
    if not linkname or linkname.startswith("/") or "\\" in linkname:
        return None
    out = list(base)
    for p in PurePosixPath(linkname).parts:
        if p == "..":
            if not out:
                return None
            out.pop()
        elif p not in ("", "."):
            out.append(p)
    return tuple(out) if out else None
