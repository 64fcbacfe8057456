"""What this x86 CPU can execute, detected once: the ISA the native CPU kernels choose paths for.

Features come from the ``flags`` line of ``/proc/cpuinfo`` (Linux), else from
``torch.backends.cpu.get_cpu_capability()`` (which only tells AVX2 from AVX-512).

``AUTOQ_CPU_ISA`` caps the detected ISA, so that the paths of a smaller CPU can be tested and
benchmarked on a bigger one: ``avx2`` (AVX2 + FMA, no native bf16: what an AMD EPYC Zen 2/3
offers), ``avx512`` (AVX-512 without bf16), ``avx512_bf16``, ``amx``; ``native`` or unset: no
cap. The cap only removes features: it never claims one the CPU lacks. Our own GEMV kernels
(``autoq/kernels/gemv.c``) then run their AVX2 code, so a forced ``avx2`` times AVX2 instructions
for them; torch's own ops keep their ISA unless ``ATEN_CPU_CAPABILITY=avx2`` and
``ONEDNN_MAX_CPU_ISA=AVX2`` are set too (``bench/formats_cpu.py --isa avx2`` sets both).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ISA_ENV = "AUTOQ_CPU_ISA"
ISA_LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")


@dataclass(frozen=True)
class CpuIsa:
    avx2: bool = False  # AVX2 + FMA
    avx512: bool = False  # AVX-512 F/BW/VL
    avx512_bf16: bool = False
    vnni: bool = False  # AVX512-VNNI or AVX-VNNI (int8 dot products)
    amx_bf16: bool = False
    amx_int8: bool = False
    forced: str | None = None  # the AUTOQ_CPU_ISA cap, when set

    @property
    def name(self) -> str:
        """The highest level: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or ``baseline``."""
        if self.amx_bf16:
            return "amx"
        if self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "baseline"

    def describe(self) -> str:
        features = [f for f in ("avx2", "avx512", "avx512_bf16", "vnni", "amx_bf16", "amx_int8") if getattr(self, f)]
        text = f"{self.name} ({', '.join(features) or 'no AVX2'})"
        return f"{text}, forced by {ISA_ENV}={self.forced}" if self.forced else text


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect_native() -> CpuIsa:
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo: what torch dispatches to
        capability = torch.backends.cpu.get_cpu_capability()
        return CpuIsa(avx2=capability in ("AVX2", "AVX512"), avx512=capability == "AVX512")
    return CpuIsa(
        avx2={"avx2", "fma"} <= flags,
        avx512={"avx512f", "avx512bw", "avx512vl"} <= flags,
        avx512_bf16="avx512_bf16" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
        amx_bf16="amx_bf16" in flags,
        amx_int8="amx_int8" in flags,
    )


def capped(isa: CpuIsa, level: str) -> CpuIsa:
    """``isa`` without the features above ``level`` (one of ``ISA_LEVELS``)."""
    rank = ISA_LEVELS.index(level)
    return CpuIsa(
        avx2=isa.avx2,
        avx512=isa.avx512 and rank >= 1,
        avx512_bf16=isa.avx512_bf16 and rank >= 2,
        vnni=isa.vnni and rank >= 1,  # AVX2 CPUs with AVX-VNNI exist, but the cap models the older ones
        amx_bf16=isa.amx_bf16 and rank >= 3,
        amx_int8=isa.amx_int8 and rank >= 3,
        forced=level,
    )


@functools.cache
def _isa(forced: str) -> CpuIsa:
    native = detect_native()
    if forced in ("", "native"):
        return native
    if forced not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={forced!r} is not one of native, {', '.join(ISA_LEVELS)}")
    return capped(native, forced)


def cpu_isa() -> CpuIsa:
    """This CPU's features, capped by ``AUTOQ_CPU_ISA`` (detected once per value of it)."""
    return _isa(os.environ.get(ISA_ENV, "").strip().lower())


def has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX): only then are torch's bf16 CPU kernels
    faster than fp32 ones; elsewhere bf16 is converted to fp32 in software."""
    isa = cpu_isa()
    return isa.avx512_bf16 or isa.amx_bf16
