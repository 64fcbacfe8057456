"""Hostile uploads and model directories, in process: each reproduction of issue 14 refused
with a 4xx before any large allocation or write, and the loader confined to the model's own
directory."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from test_service_support import make_tiny_bert, tar_bytes, tar_member, tar_with

from autoq.models import load_model, resolve_model_dir
from service.models import UnknownModel, resolve_model
from service.settings import Settings
from service.store import Store
from service.uploads import (
    ArchiveError,
    ModelDirError,
    ModelLimits,
    TooLarge,
    check_model_dir,
    unpack,
)

MiB = 1 << 20
BERT = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 64, "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 32}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A well-formed safetensors file of zero-filled tensors ``{name: (dtype, shape)}``."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = sizes[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * offset


def weights(values: int = 64 * 16) -> bytes:
    return safetensors_bytes({"embeddings.word_embeddings.weight": ("F32", [values // 16, 16])})


def model_dir(path: Path, config: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config if config is not None else BERT))
    for name, data in (files if files is not None else {"model.safetensors": weights()}).items():
        (path / name).write_bytes(data)
    return path


def tar_of(files: dict[str, bytes]) -> bytes:
    return tar_with([tar_member(name, data) for name, data in files.items()])


def unpack_bytes(tmp_path: Path, data: bytes, max_bytes: int = 50 * MiB, **kwargs) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = tmp_path / "upload.part"
    archive.write_bytes(data)
    return unpack(archive, tmp_path / "out", max_bytes, **kwargs).path


def peak_allocation(action) -> int:
    """Peak bytes allocated by Python while ``action()`` runs (it must raise)."""
    tracemalloc.start()
    try:
        with pytest.raises((ArchiveError, ModelDirError)) as raised:
            action()
        return tracemalloc.get_traced_memory()[1], raised.value
    finally:
        tracemalloc.stop()


# -- the index escape -------------------------------------------------------------------------


def index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@pytest.mark.parametrize("shard", ["../../outside/model.safetensors", "/etc/model.safetensors",
                                   "sub/model.safetensors", "missing.safetensors",
                                   "..", "model.bin.json"])
def test_index_may_name_only_shards_of_the_upload(tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(weights())
    files = {"config.json": json.dumps(BERT).encode(),
             "model.safetensors.index.json": index({"embeddings.word_embeddings.weight": shard})}
    with pytest.raises(ModelDirError, match="shard"):
        unpack_bytes(tmp_path, tar_of(files))


def test_index_with_its_shards_is_accepted_and_checked(tmp_path):
    first = safetensors_bytes({"a.weight": ("F32", [64, 16])})
    second = safetensors_bytes({"b.weight": ("F32", [64, 16])})
    files = {"config.json": json.dumps(BERT).encode(),
             "model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second,
             "model.safetensors.index.json": index({"a.weight": "model-00001-of-00002.safetensors",
                                                    "b.weight": "model-00002-of-00002.safetensors"})}
    assert (unpack_bytes(tmp_path / "ok", tar_of(files)) / "config.json").is_file()
    wrong = {**files, "model.safetensors.index.json": index({
        "a.weight": "model-00002-of-00002.safetensors"})}
    with pytest.raises(ModelDirError, match="does not hold it"):
        unpack_bytes(tmp_path / "wrong", tar_of(wrong))
    # transformers would load model.safetensors first: it is checked too.
    beside = {**files, "model.safetensors": safetensors_bytes({})}
    with pytest.raises(ModelDirError, match="holds no tensors"):
        unpack_bytes(tmp_path / "beside", tar_of(beside))


def test_loader_refuses_an_index_or_link_that_leaves_the_directory(tmp_path):
    outside = model_dir(tmp_path / "outside")
    escaping = model_dir(tmp_path / "root" / "escaping", files={
        "model.safetensors": weights(),
        "model.safetensors.index.json": index({"embeddings.word_embeddings.weight":
                                               "../../outside/model.safetensors"})})
    with pytest.raises(ValueError, match="not a file of"):
        resolve_model_dir(escaping)
    linked = model_dir(tmp_path / "root" / "linked", files={})
    (linked / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ValueError, match="links outside"):
        resolve_model_dir(linked)
    adapter = model_dir(tmp_path / "root" / "adapter", files={
        "model.safetensors": weights(),
        "adapter_config.json": json.dumps({"base_model_name_or_path": str(outside)}).encode()})
    with pytest.raises(ValueError, match="adapter_config.json"):
        resolve_model_dir(adapter)


def test_loader_refuses_missing_weights_instead_of_random_init(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_bert(tmp_path / "tiny")
    tensors = load_file(path / "model.safetensors")
    del tensors["embeddings.token_type_embeddings.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight.*token_type_embeddings"):
        load_model(path)


# -- what an archive may cost ----------------------------------------------------------------


def raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """One ustar header block claiming ``size`` bytes of payload."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_extension_header_bomb_refused_before_its_payload_is_read(tmp_path, kind):
    # A 1 MB file whose long-name/PAX header claims 1.4 GB: tarfile would read it whole.
    data = raw_header(b"././@LongLink", kind, 1_400_000_000) + b"a" * MiB
    peak, error = peak_allocation(lambda: unpack_bytes(tmp_path, data))
    assert isinstance(error, TooLarge) and "extension header" in str(error)
    assert peak < 8 * MiB, peak
    assert not (tmp_path / "out").exists()


def test_chained_and_many_extension_headers_refused(tmp_path):
    chain = b"".join(raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 100) + b"x" * 512
                     for _ in range(2000))
    with pytest.raises(ArchiveError, match="chains extension headers"):
        unpack_bytes(tmp_path / "chain", chain)
    many = tar_with([tar_member(f"{i:05d}-" + "n" * 200, b"") for i in range(10_001)])
    with pytest.raises(TooLarge, match="more than 10000 members"):
        unpack_bytes(tmp_path / "many", many)


def test_gzip_bomb_refused_from_its_headers(tmp_path):
    # The header claims 8 GiB; nothing of it is decompressed, nothing written.
    bomb = gzip.compress(raw_header(b"model.safetensors", tarfile.REGTYPE, 8 << 30)
                         + b"\0" * (4 * MiB))
    peak, error = peak_allocation(lambda: unpack_bytes(tmp_path, bomb, max_bytes=100 * MiB))
    assert isinstance(error, TooLarge) and "limit" in str(error)
    assert peak < 16 * MiB, peak
    assert not (tmp_path / "out").exists()


def test_zip_sizes_checked_from_the_central_directory(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(BERT))
        archive.writestr("model.safetensors", b"\0" * (3 * MiB))
    with pytest.raises(TooLarge, match="limit"):
        unpack_bytes(tmp_path, buffer.getvalue(), max_bytes=2 * MiB)
    assert not (tmp_path / "out").exists()


def test_space_check_sees_the_declared_size_before_anything_is_written(tmp_path):
    asked: list[int] = []

    def refuse(declared: int) -> None:
        asked.append(declared)
        raise TooLarge("over the quota")

    files = {"config.json": json.dumps(BERT).encode(), "model.safetensors": weights()}
    with pytest.raises(TooLarge, match="quota"):
        unpack_bytes(tmp_path, tar_of(files), check_space=refuse)
    assert asked == [sum(map(len, files.values()))]
    assert not (tmp_path / "out").exists()


def test_quota_and_free_space(tmp_path):
    from service.models import SPACE

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    quota = Settings(data_dir=tmp_path, storage_quota_bytes=1000, min_free_bytes=0)
    with SPACE.reserve(quota, store, 600, "the first upload"):
        with pytest.raises(TooLarge, match="storage quota"):
            with SPACE.reserve(quota, store, 600, "the second upload"):
                pass
    with SPACE.reserve(quota, store, 600, "the second upload"):  # the first one is done
        pass
    disk = Settings(data_dir=tmp_path, min_free_bytes=1 << 60)
    with pytest.raises(TooLarge, match="free disk space"):
        with SPACE.reserve(disk, store, 1, "an upload", quota=False):
            pass


# -- the model directory ---------------------------------------------------------------------


@pytest.mark.parametrize(("files", "needle"), [
    ({"model.safetensors": safetensors_bytes({})}, "holds no tensors"),
    ({"model.safetensors": b""}, "too short"),
    ({"model.safetensors": weights()[:-4]}, "truncated"),
    ({"model.safetensors": weights() + b"extra"}, "trailing data"),
    ({"weights.safetensors": weights()}, "no model.safetensors"),
    ({"model.safetensors": weights(), "adapter_config.json": b"{}"}, "adapter_config.json"),
])
def test_weights_must_be_whole_safetensors_files(tmp_path, files, needle):
    with pytest.raises(ModelDirError, match=needle):
        check_model_dir(model_dir(tmp_path / "m", files=files), ModelLimits())


@pytest.mark.parametrize(("change", "needle"), [
    ({"num_hidden_layers": 100_000}, "num_hidden_layers"),
    ({"hidden_size": 1 << 20}, "hidden_size"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"hidden_size": 1024, "num_hidden_layers": 24}, "weights are missing"),
    ({"text_config": {"hidden_size": 4096, "num_hidden_layers": 32}}, "weights are missing"),
])
def test_config_dimensions_bounded(tmp_path, change, needle):
    # A 300 KB upload must not make a worker build a multi-GB model.
    with pytest.raises(ModelDirError, match=needle):
        check_model_dir(model_dir(tmp_path / "m", config={**BERT, **change}), ModelLimits())


def test_parameter_limit(tmp_path):
    path = model_dir(tmp_path / "m")
    check_model_dir(path, ModelLimits())
    with pytest.raises(ModelDirError, match="at most 1,000"):
        check_model_dir(path, ModelLimits(max_parameters=1000))


def test_real_model_passes(tmp_path):
    path = unpack_bytes(tmp_path, tar_bytes(make_tiny_bert(tmp_path / "tiny")))
    assert (path / "model.safetensors").is_file()


# -- model paths -------------------------------------------------------------------------------


def test_model_path_errors_are_client_errors(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    settings = Settings(data_dir=tmp_path / "data", model_roots=str(root))
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    cases = {
        f"{root}/loop": 404, f"{root}/{'x' * 300}": 404, f"{root}/a\x00b": 422,
        f"{root}/missing": 404, str(root): 422, "/etc": 403, "mdl_" + "0" * 32: 404,
        "bundled:nope": 404, f"{root}/{'d/' * 3000}": 404,
    }
    for spec, status in cases.items():
        with pytest.raises(UnknownModel) as raised:
            resolve_model(settings, store, spec)
        assert raised.value.status == status, (spec[:80], raised.value)
        assert str(raised.value)


def test_scan_stops_at_the_space_left(tmp_path):
    files = {"config.json": json.dumps(BERT).encode(), "model.safetensors": weights()}
    with pytest.raises(TooLarge, match="can still store"):
        unpack_bytes(tmp_path, tar_of(files), space_left=100)
    assert not (tmp_path / "out").exists()
