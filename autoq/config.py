"""``SearchConfig``: every setting of a search, validated once, hashed into the cache keys.

``autoq.search``, ``autoq.autoquant``, the pipeline, the CLI and the job service all take one
``SearchConfig`` (or its fields as keyword arguments). Its :meth:`SearchConfig.stats_identity`
is what the budget-independent statistics depend on, and :func:`plan_key` adds what the plan
itself depends on, so a changed setting always misses the cache and an unchanged one hits it.

A ``loss_fn`` is identified by what it computes, not by its name: a function by its bytecode,
constants, defaults, closure values and the simple globals it reads; a ``functools.partial`` by
its function and arguments; an ``nn.Module`` (e.g. ``CrossEntropyLoss(label_smoothing=0.1)``) by
its class, public attributes and tensors; a bound method by its function and object.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoq import formats as formats_registry
from autoq import solve
from autoq.cache import make_key
from autoq.sensitivity import PROBES

METHODS = ("rtn", "gptq", "auto")

# --------------------------------------------------------------------------- fingerprints


def value_fingerprint(value: Any, _depth: int = 0) -> str:
    """A stable text for a value a loss function may depend on."""
    if _depth > 6:
        return f"<{type(value).__qualname__}: too deep>"
    deeper = functools.partial(value_fingerprint, _depth=_depth + 1)
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return repr(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16] \
            if data.device.type != "meta" and data.numel() else "empty"
        return f"tensor{tuple(data.shape)}{data.dtype}:{digest}"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(map(deeper, value)) if isinstance(value, set | frozenset) else map(deeper, value)
        return f"{type(value).__name__}[{','.join(items)}]"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{deeper(k)}:{deeper(v)}" for k, v in value.items())) + "}"
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if isinstance(value, type):
        return f"class:{value.__module__}.{value.__qualname__}"
    if callable(value) or isinstance(value, nn.Module):
        return callable_fingerprint(value, _depth + 1)
    return _object_fingerprint(value, _depth)


def _object_fingerprint(obj: Any, depth: int) -> str:
    state = {k: v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")}
    if isinstance(obj, nn.Module):
        state["state_dict"] = dict(obj.state_dict())
        state["children"] = dict(obj.named_children())
    return f"{type(obj).__module__}.{type(obj).__qualname__}" + value_fingerprint(state, depth + 1)


def _code_fingerprint(code: types.CodeType) -> str:
    consts = [(_code_fingerprint(c) if isinstance(c, types.CodeType) else repr(c)) for c in code.co_consts]
    return code.co_code.hex() + repr(consts) + repr(code.co_names)


def callable_fingerprint(fn: Callable, _depth: int = 0) -> str:
    """A stable text for what ``fn`` computes (see the module docstring)."""
    if isinstance(fn, functools.partial):
        return ("partial(" + callable_fingerprint(fn.func, _depth + 1) + value_fingerprint(fn.args, _depth + 1)
                + value_fingerprint(fn.keywords, _depth + 1) + ")")
    if isinstance(fn, types.MethodType):
        return callable_fingerprint(fn.__func__, _depth + 1) + "@" + value_fingerprint(fn.__self__, _depth + 1)
    if isinstance(fn, types.FunctionType):
        code = fn.__code__
        closure = [cell.cell_contents for cell in fn.__closure__ or ()]
        simple_globals = {name: fn.__globals__[name] for name in code.co_names
                          if isinstance(fn.__globals__.get(name), bool | int | float | str | torch.Tensor)}
        return (f"{fn.__module__}.{fn.__qualname__}:" + _code_fingerprint(code)
                + value_fingerprint([fn.__defaults__, fn.__kwdefaults__, closure, simple_globals], _depth + 1))
    if isinstance(fn, types.BuiltinFunctionType):
        return f"builtin:{getattr(fn, '__module__', '')}.{fn.__qualname__}"
    return _object_fingerprint(fn, _depth)  # nn.Module losses and other callable objects


def loss_identity(loss_fn: Callable | None) -> str | None:
    return None if loss_fn is None else make_key(callable_fingerprint(loss_fn))


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a search.

    ``effective_bits``: storage budget, bits per weight element averaged over the quantizable
    layers. ``objective``: ``"balanced"``, ``"accuracy"`` or ``"speed"`` (see ``autoq.solve``).
    ``formats``: candidate format names (default: every registered format that is a default
    candidate, i.e. all but asymmetric int4; ``none`` is always one).
    ``groups``: regex rules with a capture group for layers that must share a format.
    ``exclude``: regexes of layer names left out of the search. ``loss_fn(model, batch)``:
    what sensitivity differentiates (default: the model's own loss when batches carry labels,
    else random output probes). ``refine_trials``: when > 0, an NSGA-II study measuring the real
    loss on held-out batches refines the plan. ``probes``/``seed``: the sensitivity estimator.
    ``method``: how weights are quantized: ``"rtn"`` (round to nearest), ``"gptq"`` (GPTQ on
    the calibration activations; needs the calibration again to ``apply`` a plan) or ``"auto"``
    (each layer and format takes whichever of the two scores lower).
    ``cache_dir``: where plans, statistics and timings are cached (not part of any key).
    ``max_memory`` (bytes, default 1 GiB) and ``spill_dir`` (default: the system's temporary
    directory): for a streamed search, how many bytes of activations and gradients are kept in
    memory between blocks, and where the rest is spilled (neither changes a result).
    ``workers`` (default 1) and ``ray_address``: a streamed search's sensitivity pass split by
    calibration batch over that many Ray workers (each reads the model directory, so on a
    cluster the path must exist on every node; default address: a running Ray or a new local
    one); the same plan as one worker, sooner when the workers have their own cores or GPUs.
    """

    effective_bits: float | None = solve.DEFAULT_BUDGET
    objective: str = "balanced"
    formats: tuple[str, ...] | None = None
    loss_fn: Callable | None = field(default=None, compare=False)
    groups: tuple[str, ...] | None = solve.DEFAULT_GROUP_RULES
    exclude: tuple[str, ...] = ()
    refine_trials: int = 0
    probes: int = PROBES
    seed: int = 0
    method: str = "rtn"
    cache_dir: str | None = field(default=None, compare=False)
    max_memory: int = field(default=1 << 30, compare=False)
    spill_dir: str | None = field(default=None, compare=False)
    workers: int = field(default=1, compare=False)
    ray_address: str | None = field(default=None, compare=False)

    def __post_init__(self):
        budget = solve.DEFAULT_BUDGET if self.effective_bits is None else self.effective_bits
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"effective_bits must be a positive number, got {budget!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.objective not in solve.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(solve.OBJECTIVES)}")
        set_ = functools.partial(object.__setattr__, self)
        set_("effective_bits", float(budget))
        set_("formats", _formats(self.formats))
        set_("groups", _strings("groups", solve.DEFAULT_GROUP_RULES if self.groups is None else self.groups))
        set_("exclude", _strings("exclude", self.exclude))
        solve.group_layers([], list(self.groups))  # a clear error for a bad rule, before any work
        for name in ("refine_trials", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"probes must be a positive integer, got {self.probes!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable loss_fn(model, batch), got {type(self.loss_fn).__name__}")
        if self.cache_dir is not None:
            set_("cache_dir", str(self.cache_dir))
        if isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int) or self.max_memory < 0:
            raise ValueError(f"max_memory must be a number of bytes (>= 0), got {self.max_memory!r}")
        if self.spill_dir is not None:
            set_("spill_dir", str(self.spill_dir))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer (Ray workers for the sensitivity pass), "
                             f"got {self.workers!r}")

    @classmethod
    def build(cls, config: SearchConfig | None = None, **settings) -> SearchConfig:
        """``config`` (default: all defaults) with ``settings`` replacing its fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown search setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"config must be a SearchConfig, got {type(base).__name__}")
        return dataclasses.replace(base, **settings) if settings else base

    def stats_identity(self) -> list:
        """What the budget-independent statistics depend on, besides model, data and hardware."""
        return [list(self.formats), list(self.exclude), loss_identity(self.loss_fn), self.probes, self.seed,
                self.method]


def plan_key(stats_key: str, budget: float, objective: str, groups: Iterable[str], refine_trials: int) -> str:
    """The cache key of a plan: its statistics plus what the solve depends on."""
    return make_key("plan", stats_key, float(budget), objective, list(groups), refine_trials)


def _formats(requested: Iterable[str] | None) -> tuple[str, ...]:
    if isinstance(requested, str):
        raise TypeError("formats must be a list of format names, not one string")
    names = ([f.name for f in formats_registry.all_formats() if f.default_candidate]
             if requested is None else list(requested))
    if not names:
        raise ValueError(f"formats is empty; choose among {', '.join(formats_registry.names())}")
    for name in names:
        formats_registry.get(name)  # a clear error for unknown names
    return tuple(dict.fromkeys([formats_registry.UNQUANTIZED, *names]))  # a layer can always stay float


def _strings(name: str, values: Iterable[str] | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of regular expressions, not one string")
    return tuple(str(v) for v in values)
