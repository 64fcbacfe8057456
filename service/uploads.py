"""Unpack an uploaded model archive (tar, tar.gz/bz2/xz or zip) safely, then validate the model.

Nothing is trusted. Every member header is checked before anything is written: only regular
files and directories (no links, devices, FIFOs or sparse files); names relative and inside the
target (no ``/``-rooted names, no ``..``, no backslashes); the member count and the sum of the
declared sizes capped, and the caller's ``check_space`` consulted with that sum (quota, free
space). tar extension headers (GNU long names, PAX records) are size-checked before tarfile reads
their payload. While writing, the bytes actually written are counted again.

The result must be a Hugging Face model directory transformers can load without reaching outside
it and without random-initialising anything: a config.json within the configured dimensions,
safetensors weights only (``model.safetensors``, or shards listed by
``model.safetensors.index.json`` that are plain files of the upload), every shard a well-formed
safetensors file with tensors, and as many stored values as the config implies parameters. Pickle
files, Python code and adapter configs are refused: uploads are never unpickled, never run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

MAX_MEMBERS = 10_000
MAX_NAME_LENGTH = 1024
# A tar extension header (GNU long name/link, PAX record) holds a name and a few attributes.
MAX_EXTENSION_PAYLOAD = 64 * 1024
MAX_EXTENSION_CHAIN = 4
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 64 * 1024 * 1024
CHUNK = 1 << 20
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# Formats that unpickle (or run code) when loaded; a model upload must not contain any.
FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                      ".npz", ".py", ".pyc", ".so", ".h5", ".msgpack", ".gguf"}
# transformers follows an adapter config to a base model named inside it: anywhere.
FORBIDDEN_NAMES = {"adapter_config.json", "adapter_model.safetensors"}
# Bits per element of each safetensors dtype.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class ArchiveError(ValueError):
    """The archive is malformed or unsafe (a 400 for the client)."""


class TooLarge(ArchiveError):
    """The archive, or what it would unpack to, is over a size limit (a 413 for the client)."""


class ModelDirError(ValueError):
    """The archive is fine but does not hold a usable model (a 422 for the client)."""


@dataclass(frozen=True)
class ModelLimits:
    """What a model's config may ask for (checked before any worker builds the model)."""

    max_parameters: int = 20_000_000_000
    max_layers: int = 256
    max_hidden_size: int = 32_768


@dataclass
class UnpackedModel:
    path: Path  # the directory holding config.json
    size_bytes: int
    files: int


@dataclass
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    open: Callable[[], BinaryIO] | None


def safe_parts(name: str) -> tuple[str, ...]:
    """The path components of an archive member name, or ArchiveError if it could escape."""
    if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise ArchiveError(f"archive member has an invalid name: {name[:100]!r}")
    if "\\" in name:
        raise ArchiveError(f"archive member {name[:200]!r} contains a backslash")
    if name.startswith("/"):
        raise ArchiveError(f"archive member {name[:200]!r} has an absolute path")
    parts = tuple(part for part in PurePosixPath(name).parts if part != ".")
    if ".." in parts:
        raise ArchiveError(f"archive member {name[:200]!r} escapes the archive directory (..)")
    if not parts:
        raise ArchiveError(f"archive member {name[:200]!r} has an empty path")
    return parts


# -- tar: headers checked before tarfile acts on them ------------------------------------------

_EXTENSIONS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
               tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses large or chained extension headers before their payload is read.

    tarfile reads a GNU long-name or PAX payload whole (its size is the header's claim) and
    follows chains of them recursively; sparse maps are read until complete. None of that is
    allowed to cost more than a few blocks.
    """

    def _proc_member(self, archive: Any) -> Any:  # type: ignore[override]
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError("archive has a sparse member; sparse files are refused")
        if self.type not in _EXTENSIONS:
            return super()._proc_member(archive)
        if self.size > MAX_EXTENSION_PAYLOAD:
            raise TooLarge(f"archive has a {self.size}-byte extension header (long name or PAX "
                           f"record); the limit is {MAX_EXTENSION_PAYLOAD} bytes")
        depth = getattr(archive, "_autoq_extension_depth", 0)
        if depth >= MAX_EXTENSION_CHAIN:
            raise ArchiveError("archive chains extension headers (long names or PAX records)")
        archive._autoq_extension_depth = depth + 1
        try:
            return super()._proc_member(archive)
        finally:
            archive._autoq_extension_depth = depth

    def _proc_gnusparse_00(self, *args: Any) -> Any:  # type: ignore[override]
        raise ArchiveError("archive has a sparse member; sparse files are refused")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


@dataclass
class _Budget:
    """The sum of the declared member sizes, refused as soon as it passes a limit."""

    max_bytes: int
    space_left: int | None  # what the server can still store (quota, free disk), if known
    declared: int = 0

    def add(self, size: int) -> None:
        self.declared += size
        if self.declared > self.max_bytes:
            raise TooLarge(f"the archive unpacks to more than the limit of {self.max_bytes} bytes")
        if self.space_left is not None and self.declared > self.space_left:
            raise TooLarge(f"the archive unpacks to more than the {max(self.space_left, 0)} "
                           f"bytes the server can still store (storage quota, free disk space)")


def _tar_members(archive: tarfile.TarFile, budget: _Budget) -> list[_Member]:
    members: list[_Member] = []
    for count, info in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise TooLarge(f"archive has more than {MAX_MEMBERS} members")
        parts = safe_parts(info.name)
        if info.issym() or info.islnk():
            raise ArchiveError(f"archive member {info.name[:200]!r} is a link; links are refused")
        if info.isdir():
            members.append(_Member(parts, True, 0, None))
        elif info.isreg() and not info.issparse():
            budget.add(info.size)
            members.append(_Member(parts, False, info.size,
                                   lambda info=info: archive.extractfile(info)))  # type: ignore[misc]
        else:
            raise ArchiveError(
                f"archive member {info.name[:200]!r} is not a regular file or directory")
    return members


def _zip_members(archive: zipfile.ZipFile, budget: _Budget) -> list[_Member]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise TooLarge(f"archive has more than {MAX_MEMBERS} members")
    members: list[_Member] = []
    for info in infos:
        parts = safe_parts(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no type
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"archive member {info.filename[:200]!r} is a symlink; links are refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(
                f"archive member {info.filename[:200]!r} is not a regular file or directory")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member {info.filename[:200]!r} is encrypted")
        if info.is_dir():
            members.append(_Member(parts, True, 0, None))
            continue
        budget.add(info.file_size)
        members.append(_Member(parts, False, info.file_size,
                               lambda info=info: archive.open(info)))  # type: ignore[misc]
    return members


def _open_archive(path: Path) -> tuple[str, tarfile.TarFile | zipfile.ZipFile]:
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            return "zip", zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ArchiveError(f"not a readable zip archive: {e}") from None
    try:
        return "tar", tarfile.open(path, mode="r:*", tarinfo=_CheckedTarInfo)
    except ArchiveError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
        raise ArchiveError(
            "not a tar (optionally gzip, bzip2 or xz compressed) or zip archive") from e


def unpack(archive_path: Path, dest: Path, max_bytes: int, *,
           space_left: int | None = None,
           check_space: Callable[[int], None] | None = None,
           limits: ModelLimits | None = None) -> UnpackedModel:
    """Unpack ``archive_path`` into the new directory ``dest`` and validate the model in it.

    Every header is read and checked first, the scan stopping as soon as the declared sizes pass
    ``max_bytes`` or ``space_left``; ``check_space(declared_bytes)`` may then refuse (raise
    :class:`TooLarge`) before anything is written.
    """
    budget = _Budget(max_bytes, space_left)
    kind, archive = _open_archive(archive_path)
    total = files = 0
    try:
        with archive:
            if isinstance(archive, zipfile.ZipFile):
                members = _zip_members(archive, budget)
            else:
                members = _tar_members(archive, budget)
            declared = sum(member.size for member in members)
            if check_space is not None:
                check_space(declared)
            dest.mkdir(parents=True)
            root = dest.resolve()
            seen: set[tuple[str, ...]] = set()
            for member in members:
                if member.parts in seen:
                    raise ArchiveError(f"archive member {'/'.join(member.parts)!r} appears twice")
                seen.add(member.parts)
                target = root.joinpath(*member.parts)
                if not target.resolve().is_relative_to(root):  # defence in depth
                    raise ArchiveError(f"archive member {'/'.join(member.parts)!r} escapes the archive")
                if member.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                assert member.open is not None
                with member.open() as source:
                    total += _write_new_file(source, target, min(member.size, max_bytes - total))
                files += 1
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, NotImplementedError, OSError,
            RecursionError) as e:
        raise ArchiveError(f"the archive is damaged or uses an unsupported feature: {e}") from None
    model_dir = find_model_dir(dest.resolve())
    check_model_dir(model_dir, limits or ModelLimits())
    return UnpackedModel(model_dir, total, files)


def _write_new_file(source: BinaryIO, target: Path, budget: int) -> int:
    # O_EXCL | O_NOFOLLOW: never write through something that already exists at that name.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise TooLarge("an archive member unpacks to more than its header declares, or "
                               "the unpacked model is larger than the server's limit")
            out.write(chunk)
    return written


# -- the model directory ---------------------------------------------------------------------


def find_model_dir(root: Path) -> Path:
    """``root`` when it holds config.json, else its single top-level directory."""
    if (root / "config.json").is_file():
        return root
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise ModelDirError(
        "no config.json found: the archive must hold a Hugging Face model directory, either at "
        "its top level or inside one top-level folder")


def check_model_dir(path: Path, limits: ModelLimits) -> None:
    """Everything transformers will read in ``path`` is in it, well-formed, and complete."""
    files = list(path.rglob("*"))
    forbidden = sorted(str(p.relative_to(path)) for p in files
                       if p.suffix.lower() in FORBIDDEN_SUFFIXES or p.name in FORBIDDEN_NAMES)
    if forbidden:
        raise ModelDirError(
            f"the archive contains files that could run code, unpickle or load another model "
            f"({', '.join(forbidden[:5])}); only safetensors weights, JSON configs and "
            f"tokenizer files are accepted")
    config = read_json(path / "config.json", MAX_CONFIG_BYTES)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelDirError("config.json must be a JSON object with a \"model_type\" string")
    if "auto_map" in config:
        raise ModelDirError(
            "config.json has an auto_map (custom model code); autoq never runs uploaded code, so "
            "only architectures built into transformers are accepted")
    shards = weight_files(path)
    single = path / WEIGHTS_FILE
    # transformers loads model.safetensors when it exists, else the index's shards.
    values = sum(safetensors_values(shard) for shard in shards if shard != single)
    if single.is_file():
        values = safetensors_values(single)
    implied = implied_parameters(config, limits)
    if implied > limits.max_parameters:
        raise ModelDirError(f"config.json describes a model of about {implied:,} parameters; "
                            f"this server accepts at most {limits.max_parameters:,}")
    if implied > 2 * values + 1_000_000:
        raise ModelDirError(
            f"config.json describes a model of about {implied:,} parameters but the weights "
            f"hold only {values:,} values: weights are missing, and autoq refuses to "
            f"random-initialise them")


def read_json(path: Path, limit: int) -> Any:
    if not path.is_file() or path.is_symlink():
        raise ModelDirError(f"{path.name} is missing")
    if path.stat().st_size > limit:
        raise ModelDirError(f"{path.name} is larger than {limit} bytes")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelDirError(f"{path.name} is not valid JSON: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files transformers may open: model.safetensors and the index's shards.

    Raises ModelDirError when the index names anything but a safetensors file of ``path``.
    """
    index_path = path / INDEX_FILE
    single = path / WEIGHTS_FILE
    if not index_path.exists():
        if not single.is_file():
            raise ModelDirError(f"no {WEIGHTS_FILE} (or {INDEX_FILE} with shards) next to "
                                f"config.json")
        return [single]
    index = read_json(index_path, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(f"{INDEX_FILE} has no \"weight_map\" object")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not is_plain_name(shard) or \
                not shard.endswith(".safetensors"):
            raise ModelDirError(f"{INDEX_FILE} maps {str(tensor)[:100]!r} to "
                                f"{str(shard)[:200]!r}: shards must be .safetensors files in "
                                f"the model directory itself")
        shards.setdefault(shard, []).append(tensor)
    root = path.resolve()
    files = []
    for shard, tensors in sorted(shards.items()):
        file = path / shard
        if file.is_symlink() or not file.is_file() or file.resolve().parent != root:
            raise ModelDirError(f"{INDEX_FILE} names the shard {shard!r}, which is not in the "
                                f"upload")
        missing = set(tensors) - set(safetensors_header(file))
        if missing:
            raise ModelDirError(f"{INDEX_FILE} places {sorted(missing)[0]!r} in {shard}, which "
                                f"does not hold it")
        files.append(file)
    if single.is_file() and single not in files:
        safetensors_header(single)
        files.append(single)
    return files


def is_plain_name(name: str) -> bool:
    """A file name with no directory part that names no special entry."""
    return (0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name)


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """``{tensor: (dtype, shape, begin, end)}``; ModelDirError unless it is a whole, valid file.

    The tensors must tile the data area exactly, as the safetensors library itself requires.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ModelDirError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelDirError(f"{path.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{path.name} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    tensors: dict[str, tuple[str, list[int], int, int]] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            bits = DTYPE_BITS[dtype]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelDirError(f"{path.name}: tensor {name[:100]!r} has a malformed entry "
                                f"(dtype, shape, data_offsets)") from None
        if (end - begin) * 8 != math.prod(shape) * bits:
            raise ModelDirError(f"{path.name}: tensor {name[:100]!r} does not match its size")
        tensors[name] = (dtype, shape, begin, end)
    if not tensors:
        raise ModelDirError(f"{path.name} holds no tensors")
    position = 0
    for _, _, begin, end in sorted(tensors.values(), key=lambda t: (t[2], t[3])):
        if begin != position:
            raise ModelDirError(f"{path.name}: tensor data overlaps or leaves gaps")
        position = end
    if position != size - 8 - length:
        raise ModelDirError(f"{path.name}: the file is truncated or has trailing data "
                            f"({size - 8 - length} data bytes, tensors cover {position})")
    return tensors


def safetensors_values(path: Path) -> int:
    """The number of values stored in a safetensors file (after validating it)."""
    return sum(math.prod(shape) for _, shape, _, _ in safetensors_header(path).values())


# Config keys that size a transformer, across the architectures transformers ships.
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers",
           "decoder_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim")
_INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim",
                 "moe_intermediate_size")
_VOCAB = ("vocab_size",)
_POSITIONS = ("max_position_embeddings", "n_positions")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
MAX_DIMENSION = 1 << 24


def implied_parameters(config: dict[str, Any], limits: ModelLimits) -> int:
    """A rough count of the parameters ``config`` asks for; ModelDirError past the limits.

    Nested configs (``text_config``, ``vision_config``, ...) count too.
    """

    def dim(section: dict[str, Any], keys: tuple[str, ...], limit: int = MAX_DIMENSION) -> int:
        found = 0
        for key in keys:
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise ModelDirError(f"config.json: {key} = {str(value)[:50]} is not an integer "
                                    f"in [0, {limit}]")
            found = max(found, value)
        return found

    def count(section: dict[str, Any], depth: int) -> int:
        if depth > 4:
            raise ModelDirError("config.json nests configs too deeply")
        layers = dim(section, _LAYERS, limits.max_layers)
        hidden = dim(section, _HIDDEN, limits.max_hidden_size)
        intermediate = dim(section, _INTERMEDIATE) or 4 * hidden
        experts = max(dim(section, _EXPERTS, 4096), 1)
        own = ((dim(section, _VOCAB) + dim(section, _POSITIONS)) * hidden
               + layers * (4 * hidden * hidden + 2 * hidden * intermediate * experts))
        nested = sum(count(value, depth + 1) for value in section.values()
                     if isinstance(value, dict) and any(k in value for k in _HIDDEN + _LAYERS))
        return own + nested

    return count(config, 0)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
