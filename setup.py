"""Build hook for the one compiled piece of autoq; everything else is in pyproject.toml.

``autoq/kernels/gemv.c``: fp32 GEMV kernels over int8 / int4 weights for CPUs without native bf16
(autoq/kernels/native.py). Plain C + OpenMP, no torch headers, so it builds in pip's isolated
environment with setuptools alone; ``optional=True``: without a C compiler (or off x86) the
install still succeeds and the kernels fall back to torch's own ops.
"""

import platform

from setuptools import Extension, setup

x86 = platform.machine().lower() in ("x86_64", "amd64")
ext_modules = [
    Extension(
        "autoq.kernels._gemv",
        sources=["autoq/kernels/gemv.c"],
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        optional=True,
    )
] if x86 else []

setup(ext_modules=ext_modules)
