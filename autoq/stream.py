"""Streamed models: search, quantize and export a Hugging Face checkpoint one block at a time.

A model directory is opened as a :class:`StreamedModel`: the architecture is built on the meta
device (no memory) and the weights stay in the safetensors files, read (memory-mapped, the
mapping closed right after) into the unit being processed and released after it. The model is
cut into units run in order:

- ``entry``: everything before the first repeated block (embeddings, rotary tables). It runs as
  the whole model up to the first block, whose call is caught: the block's input and the
  arguments the model passes it (attention mask, position embeddings) are kept per batch.
- the **blocks**: each element of the model's repeated ``ModuleList`` (decoder or encoder
  layers), called with the caught arguments.
- ``exit``: everything after the last block (final norm, head, the loss). It runs as the whole
  model with every block answering with the last block's recorded output.

Entry and exit are materialised together (the parameters outside the blocks); a block alone
otherwise. Peak memory is therefore about the larger of one block and the non-block weights, plus
the activations kept between units: one hidden state per block boundary and calibration batch
(and, while scoring, one gradient per probe), held in memory up to ``max_memory`` bytes and
spilled to files beyond that.

The stages, block-wise:

- forward (profile): each block runs every calibration batch once; its layers' input shapes are
  recorded and the first layer of each distinct shape keeps a copy of its weights for timing;
- benchmark: each distinct (format, N, K, M bucket, dtype) is timed once (a Llama has 7 layer
  shapes whatever its depth), on those weights;
- sensitivity: the probes' (or the loss's) gradient enters at the exit and is carried back block
  by block (a vector-Jacobian product through the recomputed block), so only one block's graph
  exists at a time; each block's layers are checked (output SQNR on their real inputs) and scored
  for every candidate format right there, with the quantized modules freed with the block. This
  is the quantity the in-memory path computes (``autoq.sensitivity``), with the same probes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autoq import bench, sensitivity
from autoq import formats as formats_registry
from autoq.calibration import Batch, run_batch, to_device
from autoq.formats import UNQUANTIZED
from autoq.profile import LayerProfile, Profile
from autoq.sensitivity import add_layer_scores, output_gradients, output_layer, probe_seed
from autoq.swap import LayerQuantizer, float_weight, is_quantizable, layer_shape, quantizable_layers

Report = Callable[[float, str], None]

DEFAULT_MAX_MEMORY = 1 << 30  # bytes of activations and gradients kept in memory before spilling
SAMPLE_ROWS = 256  # rows of a layer's real input its formats are checked on (as in autoq.profile)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get their own mapping, unmapped when freed


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once. By default it raises its
    mmap threshold to the largest block freed so far, so once a block's weights are freed, later
    blocks' tensors come from the heap and stay resident after use: on a 12-block model the
    peak grew 188 MiB instead of 83 MiB. (Not glibc: nothing to do.)"""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; also turns off the dynamic threshold
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- the checkpoint


class _Caught(Exception):
    """Raised by the first block's stand-in once it has recorded its inputs."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the largest ``ModuleList`` of modules of one class that hold
    quantizable layers (``model.layers``, ``transformer.h``, ``encoder.layer``)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_quantizable(m) for m in module.modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (a ModuleList of layers holding "
                         "Linear layers), so it cannot be streamed; load it and pass the model object")
    return best[0], best[1]


class _Own:
    """A part made of a module's own parameters and buffers, not its children's (the modules on
    the way from the model to its blocks)."""

    def __init__(self, module: nn.Module):
        self.module = module


def _outside(model: nn.Module, blocks_name: str) -> list[tuple[str, nn.Module | _Own]]:
    """Everything but the blocks, as parts: every module beside the path from the model to its
    blocks (embeddings, final norm, head, rotary tables) and the own tensors of the modules on
    that path."""
    parts: list[tuple[str, nn.Module | _Own]] = []
    module, prefix = model, ""
    for step in blocks_name.split("."):
        parts.append((prefix, _Own(module)))
        for name, child in module.named_children():
            if name != step:
                parts.append((f"{prefix}.{name}" if prefix else name, child))
        module, prefix = getattr(module, step), (f"{prefix}.{step}" if prefix else step)
    return parts


class StreamedModel:
    """A Hugging Face model directory whose weights are read unit by unit (see the module doc).

    ``model`` is the architecture on the meta device (non-persistent buffers such as rotary
    tables are real: they are small and computed, not stored). ``device``: where units run.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        import transformers

        from autoq.checkpoint.compressed_tensors import _restore_non_persistent_buffers
        from autoq.models import resolve_model_dir

        _return_freed_memory()

        self.path = resolve_model_dir(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        if hasattr(config, "use_cache"):
            config.use_cache = False  # a cache would carry keys from one block call to the next
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_cls = getattr(transformers, architecture, None) if architecture else None
        if model_cls is None:
            raise ValueError(f"{self.path}/config.json names no architecture transformers has "
                             f"({architecture!r}); load the model and pass the model object")
        with torch.device("meta"):
            self.model = model_cls(config).eval()
        self.architecture = architecture
        self.files = self._weight_files()
        self.tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})  # target -> source
        self._check_complete()
        _restore_non_persistent_buffers(self.model, {}, "cpu")
        if self.device.type != "cpu":
            for module in self.model.modules():
                for key, buf in module._buffers.items():
                    if buf is not None and buf.device.type == "cpu":
                        module._buffers[key] = buf.to(self.device)
        self.blocks_name, self.blocks = find_blocks(self.model)
        self.block_names = [f"{self.blocks_name}.{i}" for i in range(len(self.blocks))]
        self.outer = _outside(self.model, self.blocks_name)

    # ------------------------------------------------------------------ weights on disk

    def _weight_files(self) -> dict[str, Path]:
        from autoq.models import INDEX_FILE

        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {key: self.path / file for key, file in weight_map.items()}
        files: dict[str, Path] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), file))
        return files

    def _source_key(self, key: str) -> str | None:
        if key in self.files:
            return key
        source = self.tied.get(key)
        if source in self.files:
            return source
        prefix = getattr(self.model, "base_model_prefix", "")
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in self.files:
            return key[len(prefix) + 1:]
        return None

    def _check_complete(self) -> None:
        missing = [k for k in self.model.state_dict() if self._source_key(k) is None and k not in self.tied]
        if missing:
            raise ValueError(f"{self.path}: the checkpoint lacks {len(missing)} weight(s) the config needs "
                             f"({', '.join(missing[:5])}); refusing to random-initialise them")

    def nbytes(self) -> int:
        """Bytes of the weights on disk."""
        return sum(f.stat().st_size for f in set(self.files.values()))

    def fingerprint(self, layer_shapes: dict[str, tuple[int, int]]) -> str:
        """Architecture, layer names and shapes, and every byte of the weight files (read in
        chunks, never all in memory)."""
        import hashlib

        h = hashlib.sha256(f"streamed|{self.architecture}".encode())
        h.update(json.dumps(sorted((n, list(s)) for n, s in layer_shapes.items())).encode())
        for file in sorted(set(self.files.values())):
            h.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
        return h.hexdigest()[:24]

    # ------------------------------------------------------------------ materialising units

    def _entries(self, module: nn.Module, prefix: str):
        """``(full key, owner, attribute, is_parameter)`` for the stored tensors of ``module``
        (for a :class:`_Own`, of its module's own tensors only)."""
        if isinstance(module, _Own):
            own = module.module
            for attr, p in own._parameters.items():
                if p is not None:
                    yield (f"{prefix}.{attr}" if prefix else attr), own, attr, True
            for attr, b in own._buffers.items():
                if b is not None and attr not in own._non_persistent_buffers_set:
                    yield (f"{prefix}.{attr}" if prefix else attr), own, attr, False
            return
        persistent = set(module.state_dict(prefix=prefix + "." if prefix else ""))
        for name, sub in module.named_modules(prefix=prefix, remove_duplicate=False):
            for attr, p in sub._parameters.items():
                if p is not None:
                    yield (f"{name}.{attr}" if name else attr), sub, attr, True
            for attr, b in sub._buffers.items():
                key = f"{name}.{attr}" if name else attr
                if b is not None and key in persistent:
                    yield key, sub, attr, False

    def materialize(self, parts: Sequence[tuple[str, nn.Module]]) -> None:
        """Read the weights of ``parts`` (``(prefix, module)``) onto the device."""
        wanted: dict[Path, list] = {}
        seen: dict[int, list] = {}
        for prefix, module in parts:
            for key, owner, attr, is_param in self._entries(module, prefix):
                tensor = owner._parameters[attr] if is_param else owner._buffers[attr]
                if tensor.device.type != "meta":
                    continue
                if id(tensor) in seen:  # a tied weight: the same tensor under another name
                    seen[id(tensor)].append((owner, attr, is_param))
                    continue
                source = self._source_key(key)
                if source is None:
                    source = self._source_key(self.tied.get(key, key))
                if source is None:
                    raise ValueError(f"{self.path}: no stored tensor for {key}")
                seen[id(tensor)] = [(owner, attr, is_param)]
                wanted.setdefault(self.files[source], []).append((source, seen[id(tensor)]))
        for file, items in wanted.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for source, places in items:
                    value = f.get_tensor(source).to(self.device)
                    for owner, attr, is_param in places:
                        if is_param:
                            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
                        else:
                            owner._buffers[attr] = value

    def release(self, parts: Sequence[tuple[str, nn.Module]]) -> None:
        """Put the weights of ``parts`` back on the meta device (tied weights stay tied)."""
        meta: dict[int, torch.Tensor] = {}
        for prefix, module in parts:
            for _key, owner, attr, is_param in self._entries(module, prefix):
                tensor = owner._parameters[attr] if is_param else owner._buffers[attr]
                if id(tensor) not in meta:
                    empty = torch.empty_like(tensor, device="meta")
                    meta[id(tensor)] = nn.Parameter(empty, requires_grad=False) if is_param else empty
                if is_param:
                    owner._parameters[attr] = meta[id(tensor)]
                else:
                    owner._buffers[attr] = meta[id(tensor)]

    @contextmanager
    def loaded(self, parts: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
        self.materialize(parts)
        try:
            yield
        finally:
            self.release(parts)

    def block_part(self, i: int) -> list[tuple[str, nn.Module]]:
        return [(self.block_names[i], self.blocks[i])]


# --------------------------------------------------------------------------- activations


class TensorStore:
    """Tensors by key, in memory up to ``max_memory`` bytes, in files under ``directory`` beyond."""

    def __init__(self, max_memory: int = DEFAULT_MAX_MEMORY, directory: str | os.PathLike | None = None):
        self.max_memory = max_memory
        self.memory: dict = {}
        self.in_memory = 0
        self.spilled: dict = {}
        self.spilled_bytes = 0
        self.peak = 0
        self._parent = directory
        self._dir: Path | None = None

    def put(self, key, tensor: torch.Tensor) -> None:
        self.pop(key)
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.max_memory:
            self.memory[key] = tensor
            self.in_memory += size
            self.peak = max(self.peak, self.in_memory)
            return
        if self._dir is None:
            if self._parent is not None:
                Path(self._parent).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="autoq-spill-", dir=self._parent))
        file = self._dir / f"{len(self.spilled)}-{abs(hash(key))}.safetensors"
        save_file({"t": tensor.contiguous().cpu()}, file)
        self.spilled[key] = (file, tensor.device, size)
        self.spilled_bytes += size

    def get(self, key) -> torch.Tensor:
        if key in self.memory:
            return self.memory[key]
        file, device, _ = self.spilled[key]
        return load_file(file)["t"].to(device)

    def pop(self, key) -> None:
        if key in self.memory:
            t = self.memory.pop(key)
            self.in_memory -= t.numel() * t.element_size()
        elif key in self.spilled:
            file, _, _ = self.spilled.pop(key)
            file.unlink(missing_ok=True)

    def close(self) -> None:
        self.memory.clear()
        self.in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.spilled.clear()


# --------------------------------------------------------------------------- running units


@dataclass
class _BlockCall:
    """How the model calls its blocks on one batch: the arguments besides the hidden state."""

    args: tuple
    kwargs: dict


def _hidden_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def _forward_replaced(modules: Sequence[nn.Module], forward: Callable) -> Iterator[None]:
    """Every module of ``modules`` answers with ``forward(*args, **kwargs)`` instead of its own
    (an instance attribute, so the module keeps its other attributes, e.g. ``attention_type``)."""
    for m in modules:
        m.forward = forward
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@contextmanager
def _recording(layers: Mapping[str, nn.Module], calls: list, *, grad: bool,
               last_input: list | None = None) -> Iterator[None]:
    """Record ``(name, input, output)`` of every call of ``layers``; with ``grad`` the outputs
    are made part of the graph so their gradients can be asked for. ``last_input[0]``, when
    given: the last call's input as it is in the graph."""

    def make_hook(name: str):
        def hook(module, args, output):
            if grad and not output.requires_grad:
                output = output.detach().requires_grad_(True)
            calls.append((name, args[0].detach(), output))
            if last_input is not None:
                last_input[0] = args[0]
            return output
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StreamedStats:
    """What the block-wise stages measured (the in-memory stages' results, plus how it ran)."""

    profile: Profile
    bench: bench.BenchResult
    scores: dict[str, dict[str, float]]
    dropped: dict[str, dict[str, str]]
    seconds: dict[str, float]
    note: str
    peak_rss: int = 0
    spilled_bytes: int = 0


class _Search:
    """One streamed search's state: the batches, the caught block arguments, the activations."""

    def __init__(self, sm: StreamedModel, batches: Sequence[Batch], layers: dict[str, nn.Module],
                 store: TensorStore, batch_ids: Sequence[int] | None = None):
        self.sm = sm
        self.batches = [to_device(b, sm.device) for b in batches]
        # each batch's index in the whole calibration set (its probes' seed), also on a worker
        self.batch_ids = list(range(len(batches)) if batch_ids is None else batch_ids)
        self.layers = layers
        self.store = store
        self.calls: list[_BlockCall] = []
        self.block_layers = []
        for name in sm.block_names:
            self.block_layers.append({n: m for n, m in layers.items() if n.startswith(name + ".")})
        in_blocks = {n for bl in self.block_layers for n in bl}
        self.outer_layers = {n: m for n, m in layers.items() if n not in in_blocks}
        self.entry_layers: dict[str, nn.Module] = {}
        self.exit_layers: dict[str, nn.Module] = {}
        self.output_tail: tuple | None = None  # the blocks' extra outputs when they return tuples
        self.output_factors: dict[str, torch.Tensor | None] = {}  # sensitivity.output_factor, by layer

    # ---------------------------------------------------------------- forward, profile

    def _catch(self, batch: Batch) -> tuple[torch.Tensor, _BlockCall]:
        record: dict = {}

        def catcher(*args, **kwargs):
            record["args"], record["kwargs"] = args, kwargs
            raise _Caught

        with _forward_replaced([self.sm.blocks[0]], catcher):
            try:
                run_batch(self.sm.model, batch)
            except _Caught:
                pass
        if not record:
            raise RuntimeError(f"{type(self.sm.model).__name__} never called its first block "
                               f"({self.sm.block_names[0]}); it cannot be streamed")
        args, kwargs = record["args"], dict(record["kwargs"])
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return hidden, _BlockCall(rest, kwargs)

    def _block_output(self, hidden: torch.Tensor):
        return hidden if self.output_tail is None else (hidden, *self.output_tail)

    def run_block(self, i: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
        call = self.calls[b]
        output = self.sm.blocks[i](hidden, *call.args, **call.kwargs)
        if i == len(self.sm.blocks) - 1 and not isinstance(output, torch.Tensor):
            self.output_tail = tuple(None for _ in output[1:])
        return _hidden_of(output)

    def run_exit(self, b: int, hidden: torch.Tensor):
        """The model's output on batch ``b`` with ``hidden`` as the last block's output."""
        replay = self._block_output(hidden)
        with _forward_replaced(list(self.sm.blocks), lambda *args, **kwargs: replay):
            return run_batch(self.sm.model, self.batches[b])

    def forward(self, profile: Profile, shape_weights: dict | None, report: Report | None) -> None:
        """Every batch through every unit; shapes recorded, block inputs kept in the store, and
        (into ``shape_weights`` unless None) a copy of one layer's weights per distinct shape."""
        sm, n_units = self.sm, len(self.sm.blocks) + 2

        def record(calls: list) -> None:
            for name, x, _y in calls:
                entry = profile.layers[name]
                m = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] else 0
                key = (int(m), int(x.shape[-1]))
                entry.shapes[key] = entry.shapes.get(key, 0) + 1
                entry.dtype = str(x.dtype).removeprefix("torch.")
                module = self.layers[name]
                shape = (*layer_shape(module), entry.dtype, module.bias is not None)
                if shape_weights is not None and shape not in shape_weights:  # one layer per shape, for timing
                    shape_weights[shape] = (name, _weights_copy(module))

        with torch.no_grad(), sm.loaded(sm.outer):
            for b, batch in enumerate(self.batches):
                calls: list = []
                with _recording(self.outer_layers, calls, grad=False):
                    hidden, call = self._catch(batch)
                self.entry_layers.update({n: self.layers[n] for n, _, _ in calls})
                record(calls)
                self.calls.append(call)
                self.store.put(("h", 0, b), hidden)
        if report is not None:
            report(1 / n_units, "entry")
        for i in range(len(sm.blocks)):
            with torch.no_grad(), sm.loaded(sm.block_part(i)):
                for b in range(len(self.batches)):
                    calls = []
                    with _recording(self.block_layers[i], calls, grad=False):
                        out = self.run_block(i, b, self.store.get(("h", i, b)))
                    record(calls)
                    self.store.put(("h", i + 1, b), out)
            if report is not None:
                report((i + 2) / n_units, f"block {i + 1}/{len(sm.blocks)}")
        self.exit_layers = {n: m for n, m in self.outer_layers.items() if n not in self.entry_layers}
        last = len(sm.blocks)
        with torch.no_grad(), sm.loaded(sm.outer):
            for b in range(len(self.batches)):
                calls = []
                with _recording(self.exit_layers, calls, grad=False):
                    self.run_exit(b, self.store.get(("h", last, b)))
                record(calls)
        if report is not None:
            report(1.0, f"{len(self.batches)} batches through {len(sm.blocks)} blocks")

    # ---------------------------------------------------------------- backward, sensitivity

    def score_unit(self, unit_layers: dict[str, nn.Module], calls_and_grads, candidates, scores, dropped,
                   quantizer: LayerQuantizer, sqnr_floor: float, check: bool = True) -> None:
        """Check (on the first batch, when ``check``) and score the unit's layers for every candidate format."""
        checked = not check
        inputs: dict[str, sensitivity.OutputInputs] = {}  # the output layer's, for add_output_scores
        for calls, grads, batch_size in calls_and_grads:
            if not checked:
                checked = True
                for name, module in unit_layers.items():
                    first = next((x for n, x, _ in calls if n == name), None)
                    sample = None if first is None else first.reshape(-1, first.shape[-1])[:SAMPLE_ROWS]
                    reference = bench.float_output(module, sample)
                    for fmt in candidates[name]:
                        reason = bench.check_layer(module, fmt, sample, sqnr_floor, name=name, quantized=quantizer,
                                                   reference=reference)
                        if reason:
                            dropped[name][fmt] = reason
            for name, module in unit_layers.items():
                add_layer_scores(name, module, candidates[name], quantizer, calls, grads, batch_size, scores, dropped,
                                 inputs)
            del calls, grads  # before the next batch's are made
        for name in list(inputs):
            sensitivity.add_output_scores(name, unit_layers[name], candidates[name], quantizer, inputs, scores, dropped)

    def backward(self, candidates, scores, dropped, *, loss_fn, probes: int, seed: int, sqnr_floor: float,
                 report: Report | None, check: bool = True) -> None:
        """Score every layer, unit by unit from the output back; ``check``: also run the layers'
        validity checks (on this run's first batch; a data-parallel worker without batch 0 skips them)."""
        sm, store = self.sm, self.store
        n_units = len(sm.blocks) + 2
        batch_size_of: dict[int, int] = {}

        # exit: the loss or the probes give the gradient at the last block's output. Each pass
        # yields one batch at a time from a method, so no batch's graph or gradients outlive it.
        def exit_pass():
            for b in range(len(self.batches)):
                yield self._exit_batch(b, loss_fn, probes, seed, batch_size_of)

        with sm.loaded(sm.outer):
            self.score_unit(self.exit_layers, exit_pass(), candidates, scores, dropped, LayerQuantizer(), sqnr_floor,
                            check)
        if report is not None:
            report(1 / n_units, "exit")

        for i in reversed(range(len(sm.blocks))):
            def block_pass(i=i):
                for b in range(len(self.batches)):
                    yield self._block_batch(i, b, batch_size_of[b])

            with sm.loaded(sm.block_part(i)):
                self.score_unit(self.block_layers[i], block_pass(), candidates, scores, dropped, LayerQuantizer(),
                                sqnr_floor, check)
            if report is not None:
                report((n_units - 1 - i) / n_units, f"block {i + 1}/{len(sm.blocks)}")

        if self.entry_layers:  # quantizable layers before the first block: back through the entry
            def entry_pass():
                for b in range(len(self.batches)):
                    yield self._entry_batch(b, batch_size_of[b])

            with sm.loaded(sm.outer):
                self.score_unit(self.entry_layers, entry_pass(), candidates, scores, dropped, LayerQuantizer(),
                                sqnr_floor, check)
        for b in range(len(self.batches)):
            store.pop(("g", 0, b))
        if report is not None:
            report(1.0, f"{len(self.layers)} layers scored")

    # One batch of each backward pass: ``(calls, per-probe gradients of the calls' outputs,
    # batch size)``, and the gradient at the unit's input kept in the store for the next unit.

    def _exit_batch(self, b: int, loss_fn, probes: int, seed: int, batch_size_of: dict) -> tuple:
        calls: list = []
        last_input: list = [None]
        last = len(self.sm.blocks)
        hidden = self.store.get(("h", last, b)).detach().requires_grad_(True)
        with torch.enable_grad(), _recording(self.exit_layers, calls, grad=True, last_input=last_input):
            output = self.run_exit(b, hidden)
            head = None
            if calls:  # the LM head made the output: probes start at its input
                name = calls[-1][0]
                head = output_layer(output, calls[-1][2], len(calls), last_input[0], self.layers[name], name,
                                    self.output_factors)
            last_input[0] = None
            grads, batch_size = output_gradients(output, self.batches[b], [hidden] + [y for _, _, y in calls],
                                                 loss_fn, probes, probe_seed(seed, self.batch_ids[b]), head)
        batch_size_of[b] = batch_size
        self._keep_grads(last, b, hidden, grads)
        return [(n, x, y.detach()) for n, x, y in calls], [g[1:] for g in grads], batch_size

    def _block_batch(self, i: int, b: int, batch_size: int) -> tuple:
        calls: list = []
        hidden = self.store.get(("h", i, b)).detach().requires_grad_(True)
        with torch.enable_grad(), _recording(self.block_layers[i], calls, grad=True):
            out = self.run_block(i, b, hidden)
            grads = self._backward_from(i + 1, b, out, [hidden] + [y for _, _, y in calls])
        self.store.pop(("g", i + 1, b))
        self._keep_grads(i, b, hidden, grads)
        return [(n, x, y.detach()) for n, x, y in calls], [g[1:] for g in grads], batch_size

    def _entry_batch(self, b: int, batch_size: int) -> tuple:
        calls: list = []
        with torch.enable_grad(), _recording(self.entry_layers, calls, grad=True):
            hidden, _ = self._catch(self.batches[b])
            grads = self._backward_from(0, b, hidden, [y for _, _, y in calls])
        return [(n, x, y.detach()) for n, x, y in calls], grads, batch_size

    def _backward_from(self, boundary: int, b: int, out: torch.Tensor, tensors: list) -> list:
        """Per probe, the gradients of ``tensors`` given the stored gradient at ``out``."""
        seeds = self._grads_at(boundary, b)
        return [torch.autograd.grad(out, tensors, grad_outputs=g, allow_unused=True, retain_graph=p < len(seeds) - 1)
                for p, g in enumerate(seeds)]

    def _keep_grads(self, boundary: int, b: int, hidden: torch.Tensor, grads: list) -> None:
        stacked = [g[0] if g[0] is not None else torch.zeros_like(hidden) for g in grads]
        self.store.put(("g", boundary, b), torch.stack(stacked))
        if boundary < len(self.sm.blocks):
            self.store.pop(("h", boundary + 1, b))  # no longer needed once its gradient is known

    def _grads_at(self, boundary: int, b: int) -> list[torch.Tensor]:
        return list(self.store.get(("g", boundary, b)).unbind(0))


def _weights_copy(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding a copy of ``module``'s weight (``[out, in]``) and bias."""
    weight = float_weight(module).detach().clone()
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        holder.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return holder


def measure(sm: StreamedModel, batches: Sequence[Batch], layers: dict[str, nn.Module], fmts: Sequence[str], *,
            timings: dict[str, float], loss_fn=None, probes: int, seed: int,
            max_memory: int = DEFAULT_MAX_MEMORY, spill_dir: str | None = None,
            report: Callable[[str, float, str], None] | None = None,
            sqnr_floor: float = bench.SQNR_FLOOR_DB, workers: int = 1,
            ray_address: str | None = None) -> StreamedStats:
    """Profile, benchmark and score ``layers`` of a streamed model, block by block.

    ``workers`` > 1: the sensitivity pass (the costly part) runs data-parallel on that many Ray
    workers (``ray_address``: the cluster; default a running one or a new local one), each
    streaming the checkpoint itself over its share of the calibration batches; their scores are
    summed here. Profile and benchmark run in this process, so the timings are this machine's."""
    from autoq.stages import Stage

    def stage(name: Stage) -> Report | None:
        return None if report is None else (lambda fraction, message: report(name, fraction, message))

    fmts = list(dict.fromkeys([UNQUANTIZED, *fmts]))
    store = TensorStore(max_memory, spill_dir)
    run = _Search(sm, batches, layers, store)
    seconds: dict[str, float] = {}
    try:
        start = time.perf_counter()
        prof = Profile({name: LayerProfile(*layer_shape(m)) for name, m in layers.items()}, len(batches), {})
        shape_weights: dict[tuple, tuple[str, nn.Linear]] = {}
        run.forward(prof, shape_weights, stage(Stage.PROFILE))
        seconds[Stage.PROFILE] = time.perf_counter() - start

        start = time.perf_counter()
        dropped: dict[str, dict[str, str]] = {name: {} for name in layers}
        for name, module in layers.items():  # shape and device refusals, before any work
            for fmt in fmts:
                if reason := bench.static_reason(fmt, *layer_shape(module), sm.device):
                    dropped[name][fmt] = reason
        jobs: dict = {}
        for name, module in layers.items():  # every layer's shapes, timed on its shape's copy
            entry = prof.layers[name]
            if not entry.shapes:
                continue
            holder_name, holder = shape_weights[(*layer_shape(module), entry.dtype, module.bias is not None)]
            bench.add_shape_jobs(jobs, entry, holder, holder_name, [f for f in fmts if f not in dropped[name]])
        table = dict(timings)
        new, failed = bench.time_shapes(jobs, table, report=stage(Stage.BENCHMARK))
        table.update(new)
        del shape_weights, jobs
        seconds[Stage.BENCHMARK] = time.perf_counter() - start

        start = time.perf_counter()
        candidates = {name: list(fmts) for name in layers}
        if workers > 1:
            store.close()  # the workers compute their own activations
            scores = _score_on_ray(sm, batches, layers, candidates, dropped, workers=workers, ray_address=ray_address,
                                   loss_fn=loss_fn, probes=probes, seed=seed, sqnr_floor=sqnr_floor,
                                   max_memory=max_memory, spill_dir=spill_dir, report=stage(Stage.SENSITIVITY))
        else:
            scores = {name: {fmt: 0.0 for fmt in fmts} for name in layers}
            run.backward(candidates, scores, dropped, loss_fn=loss_fn, probes=probes, seed=seed,
                         sqnr_floor=sqnr_floor, report=stage(Stage.SENSITIVITY))
        seconds[Stage.SENSITIVITY] = time.perf_counter() - start
    finally:
        spilled = store.spilled_bytes
        held = store.peak
        store.close()
    valid = {name: [f for f in fmts if f not in dropped[name]] for name in layers}
    latency = bench.layer_latency(prof, valid, table, failed, dropped)
    for name in layers:
        for fmt in list(scores[name]):
            if fmt in dropped[name]:
                scores[name].pop(fmt)
    peak = peak_rss_bytes()
    note = (f"streamed from {sm.path.name} block by block on {sm.device}: {len(sm.blocks)} blocks, "
            f"{sm.nbytes() / 2**20:.0f} MiB of weights on disk, activations held {held / 2**20:.0f} MiB"
            + (f", {spilled / 2**20:.0f} MiB spilled to disk" if spilled else "")
            + f", peak RSS {peak / 2**20:.0f} MiB"
            + (f"; sensitivity data-parallel on {workers} Ray workers" if workers > 1 else ""))
    return StreamedStats(prof, bench.BenchResult(latency, dropped, new), scores, dropped, seconds, note,
                         peak_rss=peak, spilled_bytes=spilled)


# ------------------------------------------------------------------- data-parallel scoring


def _shards(n: int, workers: int) -> list[list[int]]:
    """Contiguous, near-equal shares of ``range(n)`` for ``workers`` (no empty share)."""
    bounds = [round(i * n / workers) for i in range(workers + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _score_shard(path: str, device: str, batches: list, batch_ids: list[int], layer_names: list[str],
                 candidates: dict[str, list[str]], *, loss_fn, probes: int, seed: int, sqnr_floor: float,
                 max_memory: int, spill_dir: str | None) -> tuple[dict, dict]:
    """One worker's share of a data-parallel sensitivity pass: its batches forward and back
    through the checkpoint it streams itself; ``(scores summed over its batches, dropped)``. The
    worker with batch 0 also runs the layers' validity checks (on batch 0, as one process would)."""
    sm = StreamedModel(path, device)
    modules = dict(sm.model.named_modules())
    layers = {name: modules[name] for name in layer_names}
    store = TensorStore(max_memory, spill_dir)
    try:
        run = _Search(sm, batches, layers, store, batch_ids)
        run.forward(Profile({n: LayerProfile(*layer_shape(m)) for n, m in layers.items()}, len(batches), {}),
                    None, None)
        scores = {name: dict.fromkeys(candidates[name], 0.0) for name in layers}
        dropped: dict[str, dict[str, str]] = {name: {} for name in layers}
        run.backward(candidates, scores, dropped, loss_fn=loss_fn, probes=probes, seed=seed, sqnr_floor=sqnr_floor,
                     report=None, check=0 in batch_ids)
    finally:
        store.close()
    return scores, dropped


def _score_on_ray(sm: StreamedModel, batches: Sequence[Batch], layers: dict[str, nn.Module],
                  candidates: dict[str, list[str]], dropped: dict[str, dict[str, str]], *, workers: int,
                  ray_address: str | None, report: Report | None, **settings) -> dict[str, dict[str, float]]:
    """The sensitivity pass split over Ray workers by calibration batch: scores summed, formats
    any worker dropped added to ``dropped`` (the checking worker's reasons first). The sum is
    the one-process sum in another order: the same plan."""
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("workers > 1 scores on Ray, which is not installed: pip install 'autoq[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    gpus = 1 if sm.device.type == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_score_shard)
    shards = _shards(len(batches), workers)
    cpu_batches = [to_device(b, torch.device("cpu")) for b in batches]
    refs = [task.remote(str(sm.path), sm.device.type, [cpu_batches[i] for i in ids], ids, list(layers), candidates,
                        **settings) for ids in shards]
    if report is not None:
        report(0.0, f"{len(batches)} batches on {len(shards)} Ray workers")
    results: dict = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[done[0]] = ray.get(done[0])
        if report is not None:
            report(len(results) / len(refs), f"{len(results)}/{len(refs)} workers done")
    ordered = [results[ref] for ref in refs]  # the checking worker (batch 0) first
    scores = {name: {fmt: 0.0 for fmt in candidates[name]} for name in layers}
    for shard_scores, shard_dropped in ordered:
        for name in layers:
            for fmt, reason in shard_dropped[name].items():
                dropped[name].setdefault(fmt, reason)
            for fmt, value in shard_scores[name].items():
                scores[name][fmt] += value
    return scores


# --------------------------------------------------------------------------- apply and export

# A streamed export holds one shard's tensors in memory, and safetensors' writer makes a bytes copy
# of them: twice this much (a 1 GiB shard made the 1.1B export peak 3 GB over idle).
EXPORT_SHARD_BYTES = 256 << 20


def _units(sm: StreamedModel) -> list[list[tuple[str, nn.Module]]]:
    """The parts materialised together, in checkpoint order: the non-block modules, then each block."""
    return [list(sm.outer), *(sm.block_part(i) for i in range(len(sm.blocks)))]


def _unit_layers(sm: StreamedModel, parts: Sequence[tuple[str, nn.Module]],
                 layer_formats: Mapping[str, str]) -> dict[str, str]:
    prefixes = tuple(f"{prefix}." for prefix, module in parts if not isinstance(module, _Own))
    names = {prefix for prefix, module in parts if not isinstance(module, _Own)}
    return {n: f for n, f in layer_formats.items() if n.startswith(prefixes) or n in names}


def layer_formats(sm: StreamedModel, assignment: Mapping[str, str]) -> dict[str, str]:
    """``{layer: format}`` over every quantizable layer of the model (``none`` where not named),
    with the assignment checked against the architecture before any weight is read."""
    from autoq.swap import tied_to_embedding

    layers = quantizable_layers(sm.model, include_tied=True)
    tied = tied_to_embedding(sm.model)
    for name, fmt_name in assignment.items():
        fmt = formats_registry.get(fmt_name)  # a clear error for an unknown format
        if name not in layers:
            raise ValueError(f"{name!r} is not a quantizable layer of {sm.architecture}; valid names "
                             f"({len(layers)}): {', '.join(list(layers)[:12])}{' ...' if len(layers) > 12 else ''}")
        if not fmt.quantized:
            continue
        if name in tied:
            raise ValueError(f"{name!r} shares its weight with the input embedding (tie_word_embeddings); "
                             "quantizing it would untie them: leave it float")
        reason = fmt.check(*layer_shape(layers[name]))
        if reason:
            raise ValueError(f"layer {name!r} cannot take {fmt_name}: {reason}")
    return {name: assignment.get(name, UNQUANTIZED) for name in layers}


def apply(sm: StreamedModel, assignment: Mapping[str, str], report: Report | None = None) -> nn.Module:
    """The model quantized by ``assignment``, built unit by unit: each unit's weights are read,
    its layers quantized (round to nearest) and its float copies dropped, so the peak is the
    quantized model plus one float block. The :class:`StreamedModel` is used up (its model is
    the result)."""
    from autoq.swap import apply as swap_apply

    chosen = layer_formats(sm, assignment)
    units = _units(sm)
    for u, parts in enumerate(units):
        sm.materialize(parts)
        quantized = {n: f for n, f in _unit_layers(sm, parts, chosen).items() if f != UNQUANTIZED}
        swap_apply(sm.model, quantized, include_tied=True)
        if report is not None:
            report((u + 1) / len(units), f"quantized {parts[0][0] if len(parts) == 1 else 'embeddings and head'}")
    return sm.model


def export(sm: StreamedModel, assignment: Mapping[str, str], path: str | Path, *, tokenizer=None, plan=None,
           max_shard_size: int = EXPORT_SHARD_BYTES, report: Report | None = None) -> Path:
    """Write the model quantized by ``assignment`` as a compressed-tensors checkpoint, unit by
    unit: each unit's weights are read, its layers quantized (round to nearest) and written with
    its float tensors, then released, so the float model never exists in memory (peak: one float
    unit plus at most one shard). ``autoq.load_quantized`` and transformers load the result."""
    from autoq.checkpoint import compressed_tensors as ct
    from autoq.checkpoint import native
    from autoq.modules import quantize_layer

    chosen = layer_formats(sm, assignment)
    layers = quantizable_layers(sm.model, include_tied=True)
    for name, fmt in chosen.items():
        if fmt != UNQUANTIZED and not isinstance(layers[name], nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(layers[name]).__name__}, and compressed-tensors "
                             "quantizes nn.Linear layers only: load the model and use autoq.save_quantized, "
                             "which writes autoq's own format for it")
    ct.warn_load_caveats(chosen)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / native.METADATA_FILE).unlink(missing_ok=True)  # a stale autoq.json would win on load
    writer = ct.ShardWriter(path, max_shard_size)
    dtype: torch.dtype | None = None
    units = _units(sm)
    for u, parts in enumerate(units):
        with sm.loaded(parts):
            unit_formats = _unit_layers(sm, parts, chosen)
            quantized = {n for n, f in unit_formats.items() if f != UNQUANTIZED}
            for prefix, module in parts:
                for key, owner, attr, is_param in sm._entries(module, prefix):
                    if key in sm.tied or key.rpartition(".")[0] in quantized:
                        continue  # tied targets are re-tied by loaders; quantized layers below
                    tensor = owner._parameters[attr] if is_param else owner._buffers[attr]
                    if dtype is None and tensor.is_floating_point():
                        dtype = tensor.dtype
                    writer.add(key, tensor.detach().cpu())
            for name in sorted(quantized):
                module = layers[name]
                qlayer = quantize_layer(float_weight(module), module.bias, unit_formats[name])
                for key, tensor in ct.export_layer(qlayer, dtype or float_weight(module).dtype).items():
                    writer.add(f"{name}.{key}", tensor.detach().cpu())
                del qlayer
        if report is not None:
            report((u + 1) / len(units), f"wrote {parts[0][0] if len(parts) == 1 else 'embeddings and head'}")
    writer.close()
    config = json.loads((sm.path / "config.json").read_text())
    ct.write_config(path, config, sm.architecture, dtype or torch.float32, chosen)
    for extra in ("generation_config.json",):
        if (sm.path / extra).is_file() and sm.path != path:
            shutil.copyfile(sm.path / extra, path / extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if plan is not None:
        plan.save(path / "plan.json")
    return path
