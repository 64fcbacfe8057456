"""The ``autoq`` command line.

    autoq quantize MODEL --bits B --out DIR [--formats F,...] [--objective O] [--calib FILE] [--plan PLAN.json]
    autoq plan show PLAN.json
    autoq plan resolve PLAN.json --bits B [--objective O] [--out NEW.json]
    autoq serve [--host H] [--port P] [--data-dir DIR]

MODEL is ``bundled:minilm`` or a local Hugging Face model directory. Progress bars go to stderr,
the summary table to stdout; bad input gives a one-line error and exit status 1.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from autoq.solve import DEFAULT_BUDGET, OBJECTIVES

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Automatic per-layer quantization search for PyTorch models.")
plan_app = typer.Typer(no_args_is_help=True, help="Inspect a plan or re-solve it for another budget.")
app.add_typer(plan_app, name="plan")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

# Errors that come from what the user typed or pointed at (not bugs): message, exit status 1.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
                UnicodeDecodeError)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


def _split_formats(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def read_calibration(path: Path | None) -> list[str]:
    """Sentences from a text file (one per line), or autoq's bundled sentences."""
    from autoq.calibration import bundled_texts

    if path is None:
        return bundled_texts()
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} has no non-empty lines; put one sentence per line")
    return texts


@app.command()
def quantize(
    model: str = typer.Argument(..., help="bundled:minilm or a local Hugging Face model directory"),
    bits: float = typer.Option(DEFAULT_BUDGET, "--bits", "-b", help="effective bits budget"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="directory for the quantized checkpoint"),
    formats: list[str] = typer.Option(None, "--formats", "-f",
                                      help="candidate formats, comma separated or repeated (default: all)"),
    objective: str = typer.Option("balanced", "--objective", help=f"one of {', '.join(OBJECTIVES)}"),
    calib: Path = typer.Option(None, "--calib", help="calibration text file, one sentence per line"),
    plan_path: Path = typer.Option(None, "--plan", help="apply this plan.json instead of searching"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="plan cache (default: $AUTOQ_CACHE_DIR "
                                   "or the per-user cache directory)"),
    method: str = typer.Option("rtn", "--method", help="how weights are quantized: rtn (round to nearest), "
                               "gptq (calibrated) or auto (per layer, whichever scores lower)"),
    measure: bool = typer.Option(False, "--measure", help="time the float (own dtype and bf16) and the "
                                 "quantized forward on a calibration batch (makes a bf16 copy)"),
    stream: bool = typer.Option(None, "--stream/--in-memory",
                                help="read the model directory one block at a time for the search, "
                                     "quantization and export, so the float model never exists in memory "
                                     "(default: whenever the job allows it: round to nearest, no --measure)"),
    workers: int = typer.Option(1, "--workers", min=1, help="Ray workers for a streamed search's sensitivity pass "
                                "(calibration batches split among them; a running Ray cluster or a new local one)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Search the best format per layer, quantize, and write the checkpoint with plan.json."""
    from autoq.config import SearchConfig
    from autoq.pipeline import quantize as run_pipeline
    from autoq.plan import Plan
    from autoq.solve import InfeasibleBudget

    try:
        config = SearchConfig(effective_bits=bits, objective=objective, formats=_split_formats(formats),
                              method=method, cache_dir=cache_dir, workers=workers)
        given_plan = Plan.load(plan_path) if plan_path is not None else None
        texts = read_calibration(calib) if given_plan is None else None
        if measure and texts is None:
            texts = read_calibration(calib)
        result = run_pipeline(model, config, calibration_texts=texts, plan=given_plan, out_dir=out_dir,
                              progress=not quiet, measure=measure, stream=stream)
        plan = result.plan
    except InfeasibleBudget as e:
        raise _fail(f"{e}; pass --bits {e.smallest:g} or more") from None
    except INPUT_ERRORS as e:
        raise _fail(str(e)) from None
    typer.echo(plan.summary(), nl=False)
    if result.speed_summary():
        out.print(result.speed_summary(), highlight=False)
    out.print(f"{'reused cached plan' if plan.from_cache else 'plan'} {plan.cache_key}; "
              f"checkpoint and plan.json written to {out_dir}", highlight=False)


@plan_app.command("show")
def plan_show(path: Path = typer.Argument(..., help="a plan.json")) -> None:
    """Print a plan as a table."""
    from autoq.plan import Plan

    try:
        plan = Plan.load(path)
    except INPUT_ERRORS as e:
        raise _fail(str(e)) from None
    typer.echo(plan.summary(), nl=False)


@plan_app.command("report")
def plan_report(
    path: Path = typer.Argument(..., help="a plan.json"),
    report_path: Path = typer.Option(..., "--out", "-o", help="write the HTML report here"),
) -> None:
    """Write a self-contained HTML report of a plan: charts of bits, sensitivity, latency and the
    budget curve (re-solved from the plan's statistics), dropped formats, stage times, settings."""
    from autoq.plan import Plan, atomic_write_text
    from autoq.report import render_report

    try:
        page = render_report(Plan.load(path))
        atomic_write_text(report_path, page)
    except (*INPUT_ERRORS, IsADirectoryError) as e:
        raise _fail(str(e)) from None
    out.print(f"report written to {report_path}", highlight=False)


@plan_app.command("resolve")
def plan_resolve(
    path: Path = typer.Argument(..., help="a plan.json"),
    bits: float = typer.Option(..., "--bits", "-b", help="new effective bits budget"),
    objective: str = typer.Option(None, "--objective", help=f"one of {', '.join(OBJECTIVES)} "
                                  "(default: the plan's)"),
    new_path: Path = typer.Option(None, "--out", "-o", help="write the new plan here"),
) -> None:
    """Re-solve a plan for another budget or objective from its stored statistics (no model)."""
    from autoq.api import resolve
    from autoq.plan import Plan
    from autoq.solve import InfeasibleBudget

    try:
        plan = resolve(Plan.load(path), effective_bits=bits, objective=objective)
    except InfeasibleBudget as e:
        raise _fail(f"{e}; pass --bits {e.smallest:g} or more") from None
    except INPUT_ERRORS as e:
        raise _fail(str(e)) from None
    typer.echo(plan.summary(), nl=False)
    if new_path is not None:
        plan.save(new_path)
        out.print(f"written to {new_path}", highlight=False)


@app.command()
def serve(
    host: str = typer.Option(None, "--host", help="interface to bind (default AUTOQ_HOST or 127.0.0.1; "
                             "a non-loopback host needs AUTOQ_TOKENS)"),
    port: int = typer.Option(None, "--port", help="TCP port (default AUTOQ_PORT or 8000)"),
    data_dir: Path = typer.Option(None, "--data-dir", help="database, uploads, artifacts and plan "
                                  "cache (default AUTOQ_DATA_DIR or ./autoq-data)"),
) -> None:
    """Run the REST job service (FastAPI + uvicorn); other settings come from AUTOQ_* variables."""
    from pydantic import ValidationError

    from service.main import serve as run_service

    try:
        run_service(host=host, port=port, data_dir=data_dir)
    except ValidationError as e:
        raise _fail(f"invalid setting: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None


if __name__ == "__main__":  # pragma: no cover
    app()
