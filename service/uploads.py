"""Unpack an uploaded model archive (tar, tar.gz/bz2/xz or zip) safely.

Nothing is trusted: members are checked before anything is written; only regular files and
directories are accepted (no symlinks, hardlinks, devices, FIFOs or sparse files); names must be
relative and stay inside the target (no ``/``-rooted names, no ``..``, no backslashes); the total
unpacked size and the number of members are capped while writing, not from the archive's own
headers. The result must be a Hugging Face model directory with safetensors weights only: pickle
files and Python code are refused, since we never unpickle uploads nor run their code.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAX_MEMBERS = 10_000
MAX_NAME_LENGTH = 1024
CHUNK = 1 << 20
# Formats that unpickle (or run code) when loaded; a model upload must not contain any.
FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                      ".npz", ".py", ".pyc", ".so"}


class ArchiveError(ValueError):
    """The archive is malformed or unsafe (a 400 for the client)."""


class ModelDirError(ValueError):
    """The archive is fine but does not hold a usable model (a 422 for the client)."""


@dataclass
class UnpackedModel:
    path: Path  # the directory holding config.json
    size_bytes: int
    files: int


@dataclass
class _Member:
    parts: tuple[str, ...]
    is_dir: bool
    open: object  # () -> binary file object, for files


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


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    for count, info in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise ArchiveError(f"archive has more than {MAX_MEMBERS} members")
        parts = safe_parts(info.name)
        if info.issym() or info.islnk():
            raise ArchiveError(f"archive member {info.name[:200]!r} is a link; links are refused")
        if info.isdir():
            yield _Member(parts, True, None)
        elif info.isreg() and not info.issparse():
            yield _Member(parts, False, lambda info=info: archive.extractfile(info))
        else:
            raise ArchiveError(
                f"archive member {info.name[:200]!r} is not a regular file or directory")


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ArchiveError(f"archive has more than {MAX_MEMBERS} members")
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
            yield _Member(parts, True, None)
        else:
            yield _Member(parts, False, lambda info=info: archive.open(info))


def _open_archive(path: Path) -> tuple[str, object]:
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            return "zip", zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ArchiveError(f"not a readable zip archive: {e}") from None
    try:
        return "tar", tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ArchiveError(
            "not a tar (optionally gzip, bzip2 or xz compressed) or zip archive") from e


def unpack(archive_path: Path, dest: Path, max_bytes: int) -> UnpackedModel:
    """Unpack ``archive_path`` into the new directory ``dest`` and validate the model in it."""
    kind, archive = _open_archive(archive_path)
    dest.mkdir(parents=True)
    root = dest.resolve()
    seen: set[tuple[str, ...]] = set()
    total = files = 0
    try:
        with archive:  # type: ignore[attr-defined]
            members = _zip_members(archive) if kind == "zip" else _tar_members(archive)
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
                with member.open() as source:  # type: ignore[operator]
                    total += _write_new_file(source, target, max_bytes - total)
                files += 1
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, NotImplementedError, OSError) as e:
        raise ArchiveError(f"the archive is damaged or uses an unsupported feature: {e}") from None
    model_dir = find_model_dir(root)
    check_model_dir(model_dir)
    return UnpackedModel(model_dir, total, files)


def _write_new_file(source: BinaryIO, target: Path, budget: int) -> int:
    # O_EXCL | O_NOFOLLOW: never write through something that already exists at that name.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > budget:
                raise ArchiveError("the unpacked model is larger than the server's limit")
            out.write(chunk)
    return written


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


def check_model_dir(path: Path) -> None:
    forbidden = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.suffix.lower() in FORBIDDEN_SUFFIXES)
    if forbidden:
        raise ModelDirError(
            f"the archive contains files that could run code or unpickle when loaded "
            f"({', '.join(forbidden[:5])}); only safetensors weights, JSON configs and tokenizer "
            f"files are accepted")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelDirError("config.json must be a JSON object with a \"model_type\" string")
    if "auto_map" in config:
        raise ModelDirError(
            "config.json has an auto_map (custom model code); autoq never runs uploaded code, so "
            "only architectures built into transformers are accepted")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelDirError("no .safetensors weights next to config.json")
    for weight in weights:
        check_safetensors_header(weight)


def check_safetensors_header(path: Path) -> None:
    """A safetensors file starts with a little-endian u64 length and that much JSON."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 1024 * 1024):
            raise ModelDirError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelDirError(f"{path.name} is not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{path.name} is not a safetensors file (bad header)")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
