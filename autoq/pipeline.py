"""The whole job in one function: load -> calibrate -> search -> apply -> save.

``quantize`` is what ``autoq.autoquant``, ``autoq quantize``, ``python -m autoq.demo`` and the
job service run. ``on_stage(stage, message)`` is called as each of the pipeline's own stages
starts (load, calibration, apply, export); the search's stages arrive through ``progress`` as
usual. Either callback may raise to stop the job between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from autoq.api import ProgressFn, apply, search
from autoq.config import SearchConfig
from autoq.plan import Plan
from autoq.stages import Stage

StageFn = Callable[[Stage, str], None]


@dataclass
class QuantizeResult:
    model: nn.Module
    tokenizer: Any
    plan: Plan


def calibration_batches(tokenizer, texts: Sequence[str] | None, source: str) -> list:
    """Token batches of ``texts`` (default: autoq's bundled sentences)."""
    from autoq.calibration import bundled_texts, text_batches

    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer files, so calibration text cannot be tokenized; "
                         "add the tokenizer to the model directory")
    return text_batches(list(texts) if texts else bundled_texts(), tokenizer)


def quantize(model: str | Path | nn.Module, config: SearchConfig | None = None, *,
             calibration: Any = None, calibration_texts: Sequence[str] | None = None,
             tokenizer: Any = None, plan: Plan | None = None, out_dir: str | Path | None = None,
             export_format: str | None = None, on_stage: StageFn | None = None,
             progress: bool | ProgressFn = True) -> QuantizeResult:
    """Load ``model`` (a model object, ``bundled:minilm`` or a local Hugging Face directory),
    search a plan on the calibration (``calibration``: batches as ``autoq.search`` takes them;
    or ``calibration_texts``, tokenized with the model's tokenizer; default: autoq's bundled
    sentences) or take ``plan`` as given, quantize in place, and write the checkpoint to
    ``out_dir`` when given (compressed-tensors where it can express the model, else autoq's
    format; or ``export_format``)."""
    from autoq.checkpoint import save_quantized
    from autoq.models import load_model

    config = config if config is not None else SearchConfig()

    def stage(name: Stage, message: str = "") -> None:
        if on_stage is not None:
            on_stage(name, message or name.value)

    if isinstance(model, nn.Module):
        loaded = model
    else:
        stage(Stage.LOAD, f"loading {model}")
        loaded, tokenizer = load_model(model)
    batches = None
    if plan is None or "gptq" in plan.methods().values():  # GPTQ weights need the calibration again
        stage(Stage.CALIBRATION)
        batches = calibration if calibration is not None else \
            calibration_batches(tokenizer, calibration_texts, str(model) if not isinstance(model, nn.Module)
                                else type(model).__name__)
    if plan is None:
        plan = search(loaded, batches, config, progress=progress)
    stage(Stage.APPLY)
    apply(loaded, plan, calibration=batches)
    if out_dir is not None:
        stage(Stage.EXPORT, f"writing {export_format or 'the default'} checkpoint")
        save_quantized(loaded, Path(out_dir), tokenizer=tokenizer, format=export_format, plan=plan)
    return QuantizeResult(loaded, tokenizer, plan)


def autoquant(model: nn.Module, calibration, config: SearchConfig | None = None, *,
              progress: bool | ProgressFn = True, **settings) -> tuple[nn.Module, Plan]:
    """:func:`autoq.search` (or reuse a cached plan), then quantize ``model`` in place.

    Same arguments as :func:`autoq.search`; returns ``(model, plan)``."""
    result = quantize(model, SearchConfig.build(config, **settings), calibration=calibration,
                      progress=progress)
    return result.model, result.plan
