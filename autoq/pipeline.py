"""The whole job in one function: load -> calibrate -> search -> apply -> save.

``quantize`` is what ``autoq.autoquant``, ``autoq quantize``, ``python -m autoq.demo`` and the
job service run. ``on_stage(stage, message)`` is called as each of the pipeline's own stages
starts (load, calibration, apply, export); the search's stages arrive through ``progress`` as
usual. Either callback may raise to stop the job between steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoq.api import ProgressFn, _reporter, _RichProgress, _stage, apply, search
from autoq.bench import forward_seconds
from autoq.calibration import as_batches
from autoq.config import SearchConfig
from autoq.plan import Plan
from autoq.stages import Stage

StageFn = Callable[[Stage, str], None]


@dataclass
class QuantizeResult:
    model: nn.Module | None  # None after a streamed export (the quantized model is on disk only)
    tokenizer: Any
    plan: Plan
    # With measure=True: median seconds of one forward on the first calibration batch, of the
    # float model in its own dtype ("float"), in bf16 ("bf16") and quantized ("quantized").
    forward_seconds: dict[str, float] | None = None

    def speed_summary(self) -> str | None:
        """Predicted and measured speed against the float model, and what to do when slower."""
        if not self.forward_seconds:
            return None
        t, totals = self.forward_seconds, self.plan.totals
        text = (f"predicted quantizable-layer latency {totals.latency * 1e3:.2f} ms vs "
                f"{totals.latency_unquantized * 1e3:.2f} ms unquantized ({totals.speedup:.2f}x); measured "
                f"forward {t['quantized'] * 1e3:.1f} ms vs {t['float'] * 1e3:.1f} ms float "
                f"({t['float'] / t['quantized']:.2f}x) and {t['bf16'] * 1e3:.1f} ms bf16 "
                f"({t['bf16'] / t['quantized']:.2f}x)")
        if t["quantized"] > t["float"]:
            text += ("\nthe quantized model is slower than the float one at this batch shape on this "
                     "machine: its kernels lose to the float GEMM here (see the plan's notes). For "
                     "speed, search with objective='speed' or a larger budget, and calibrate at the "
                     "shapes you will serve (e.g. batch 1 for decoding), where weight-only formats "
                     "read 2-4x fewer bytes")
        return text


def calibration_batches(tokenizer, texts: Sequence[str] | None, source: str) -> list:
    """Token batches of ``texts`` (default: autoq's bundled sentences)."""
    from autoq.calibration import bundled_texts, text_batches

    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer files, so calibration text cannot be tokenized; "
                         "add the tokenizer to the model directory")
    return text_batches(list(texts) if texts else bundled_texts(), tokenizer)


def stream_refusal(model: Any, config: SearchConfig, plan: Plan | None, export_format: str | None,
                   measure: bool) -> str | None:
    """Why ``quantize`` cannot stream this job (``None`` when it can): only a model directory
    searched and applied with round to nearest, without refinement, measurement or autoq's own
    checkpoint format, streams."""
    if isinstance(model, nn.Module):
        return "a model object is already in memory"
    if config.method != "rtn" or (plan is not None and "gptq" in plan.methods().values()):
        return "GPTQ needs the whole model in memory"
    if config.refine_trials:
        return "refinement evaluates the whole model"
    if measure:
        return "measuring times the whole float and quantized models"
    if export_format not in (None, "compressed-tensors"):
        return f"the {export_format} writer takes a model in memory"
    return None


def quantize(model: str | Path | nn.Module, config: SearchConfig | None = None, *,
             calibration: Any = None, calibration_texts: Sequence[str] | None = None,
             tokenizer: Any = None, plan: Plan | None = None, out_dir: str | Path | None = None,
             export_format: str | None = None, on_stage: StageFn | None = None,
             progress: bool | ProgressFn = True, measure: bool = False,
             stream: bool | None = None) -> QuantizeResult:
    """Load ``model`` (a model object, ``bundled:minilm`` or a local Hugging Face directory),
    search a plan on the calibration (``calibration``: batches as ``autoq.search`` takes them;
    or ``calibration_texts``, tokenized with the model's tokenizer; default: autoq's bundled
    sentences) or take ``plan`` as given, quantize in place, and write the checkpoint to
    ``out_dir`` when given (compressed-tensors where it can express the model, else autoq's
    format; or ``export_format``). ``measure``: time the float (own dtype and bf16) and the
    quantized model's forward on the first calibration batch (a bf16 copy is made for it).

    ``stream``: read a model directory one block at a time (``autoq.stream``) for the search,
    the apply and the export, so the float model never exists in memory; with an ``out_dir`` the
    result's ``model`` is then ``None`` (load it with ``autoq.load_quantized``). ``None``
    (default) streams whenever the job allows it (see :func:`stream_refusal`); ``True`` raises
    when it does not; ``False`` loads the model."""
    from autoq.checkpoint import save_quantized
    from autoq.models import load_model

    config = config if config is not None else SearchConfig()

    def stage(name: Stage, message: str = "") -> None:
        if on_stage is not None:
            on_stage(name, message or name.value)

    refusal = stream_refusal(model, config, plan, export_format, measure)
    if stream and refusal:
        raise ValueError(f"this job cannot be streamed: {refusal}")
    if config.workers > 1 and (refusal or stream is False):
        raise ValueError(f"workers={config.workers} splits a streamed search over Ray workers, and this job is not "
                         f"streamed ({refusal or 'stream=False'}); use workers=1")
    if stream is not False and refusal is None:
        return _quantize_streamed(model, config, calibration=calibration, calibration_texts=calibration_texts,
                                  tokenizer=tokenizer, plan=plan, out_dir=out_dir, stage=stage, progress=progress)
    if isinstance(model, nn.Module):
        loaded = model
    else:
        stage(Stage.LOAD, f"loading {model}")
        loaded, tokenizer = load_model(model)
    batches = None
    # GPTQ weights need the calibration again; measuring runs on its first batch.
    if plan is None or measure or "gptq" in plan.methods().values():
        stage(Stage.CALIBRATION)
        batches = calibration if calibration is not None else \
            calibration_batches(tokenizer, calibration_texts, str(model) if not isinstance(model, nn.Module)
                                else type(model).__name__)
    if plan is None:
        plan = search(loaded, batches, config, progress=progress)
    timed: dict[str, float] = {}
    if measure and batches:
        timed = forward_seconds({"float": loaded, "bf16": copy.deepcopy(loaded).to(torch.bfloat16)},
                                as_batches(batches)[0], input_dtypes={"bf16": torch.bfloat16})
    stage(Stage.APPLY)
    apply(loaded, plan, calibration=batches)
    if measure and batches:
        timed.update(forward_seconds({"quantized": loaded}, as_batches(batches)[0]))
    if out_dir is not None:
        stage(Stage.EXPORT, f"writing {export_format or 'the default'} checkpoint")
        save_quantized(loaded, Path(out_dir), tokenizer=tokenizer, format=export_format, plan=plan)
    return QuantizeResult(loaded, tokenizer, plan, timed or None)


def _quantize_streamed(model: str | Path, config: SearchConfig, *, calibration: Any,
                       calibration_texts: Sequence[str] | None, tokenizer: Any, plan: Plan | None,
                       out_dir: str | Path | None, stage: Callable[..., None],
                       progress: bool | ProgressFn) -> QuantizeResult:
    from autoq import stream

    stage(Stage.LOAD, f"opening {model} (streamed: one block in memory at a time)")
    streamed = stream.StreamedModel(model)
    if tokenizer is None:
        from autoq.models import load_tokenizer

        tokenizer = load_tokenizer(streamed.path)
    if plan is None:
        stage(Stage.CALIBRATION)
        batches = calibration if calibration is not None else \
            calibration_batches(tokenizer, calibration_texts, str(model))
        plan = search(streamed, batches, config, progress=progress)
    assignment = plan.assignment()
    report = _reporter(progress)
    try:
        if out_dir is None:
            stage(Stage.APPLY, "quantizing block by block")
            model_out = stream.apply(streamed, assignment, report=_stage(report, Stage.APPLY))
            return QuantizeResult(model_out, tokenizer, plan)
        stage(Stage.APPLY, "quantizing block by block, each block written as it is quantized")
        stage(Stage.EXPORT, "quantizing and writing block by block")
        stream.export(streamed, assignment, out_dir, tokenizer=tokenizer, plan=plan,
                      report=_stage(report, Stage.EXPORT))
        return QuantizeResult(None, tokenizer, plan)
    finally:
        if isinstance(report, _RichProgress):
            report.close()


def autoquant(model: nn.Module | str | Path, calibration, config: SearchConfig | None = None, *,
              progress: bool | ProgressFn = True, **settings) -> tuple[nn.Module, Plan]:
    """:func:`autoq.search` (or reuse a cached plan), then quantize ``model`` in place.

    Same arguments as :func:`autoq.search`; returns ``(model, plan)``. ``model`` may be a local
    Hugging Face directory: it is then searched and quantized block by block (the float model
    never exists in memory; GPTQ and refinement load it instead)."""
    result = quantize(model, SearchConfig.build(config, **settings), calibration=calibration,
                      progress=progress)
    return result.model, result.plan
