"""The pipeline's stage names, defined once: the search reports them in its progress callback,
the pipeline passes them to ``on_stage``, and the job service keys its progress and timings by
them."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    LOAD = "load"
    CALIBRATION = "calibration"
    PROFILE = "profile"
    BENCHMARK = "benchmark"
    SENSITIVITY = "sensitivity"
    SOLVE = "solve"
    REFINE = "refine"
    APPLY = "apply"
    EXPORT = "export"


SEARCH_STAGES = (Stage.PROFILE, Stage.BENCHMARK, Stage.SENSITIVITY, Stage.SOLVE, Stage.REFINE)
