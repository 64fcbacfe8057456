"""The HTML plan report (``autoq.report``) and ``autoq plan report``, on a small hand-built plan;
one test opens the page in headless chromium (skipped where chromium is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoq import resolve, solve
from autoq.cli import app
from autoq.plan import LayerStats, ModelInfo, Plan, SearchStats, ShapeCount, build_plan
from autoq.report import BUDGET_POINTS, budget_curve, render_report

CHARTS = ("chart-bits", "chart-sensitivity", "chart-latency", "chart-budget", "chart-stages")
BITS = {"none": 16.0, "int8_dynamic": 8.0625, "int4_g64": 4.375, "int4_g128": 4.1875}
SQNR_REASON = "output SQNR 3.0 dB on the recorded activations is below the 10 dB floor"
SHAPE_REASON = "in_features=96 is not divisible by group size 128"
NOTE = "a note with <b>markup</b> & an ampersand"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

runner = CliRunner()


def hand_plan(objective: str = "balanced") -> Plan:
    """Three blocks of four layers; quantized formats faster than unquantized (so every budget's
    balanced plan meets the latency limit); one dropped format per kind of reason."""
    layers = {}
    for block in range(3):
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            name = f"model.layers.{block}.self_attn.{proj}"
            bits, latency = dict(BITS), {"none": 1e-4, "int8_dynamic": 0.6e-4, "int4_g64": 0.8e-4,
                                         "int4_g128": 0.7e-4}
            score = {"none": 0.0, "int8_dynamic": 0.01 * (i + 1 + block), "int4_g64": 0.3 * (i + 1),
                     "int4_g128": 0.5 * (i + 1)}
            dropped = {}
            if proj == "o_proj":
                dropped["int4_g128"] = SHAPE_REASON
            if block == 2 and proj == "v_proj":
                dropped["int4_g64"] = SQNR_REASON
            for fmt in dropped:
                for table in (bits, latency, score):
                    table.pop(fmt)
            layers[name] = LayerStats(out_features=128, in_features=128, numel=128 * 128, dtype="float32",
                                      shapes=[ShapeCount(m=32, k=128, count=2)], bits=bits, latency=latency,
                                      sensitivity=score, dropped=dropped)
    stats = SearchStats(autoq_version="0.1.0", model=ModelInfo(architecture="TinyLlama<test>", fingerprint="abc"),
                        calibration="cal", num_batches=2, hardware={"device": "cpu", "name": "test cpu"},
                        formats=list(BITS), settings={"probes": 8, "seed": 0},
                        stage_seconds={"profile": 0.1, "benchmark": 1.5, "sensitivity": 2.25}, layers=layers)
    groups = solve.group_layers(stats.layers)
    solution = solve.solve(stats.costs(), 6.0, objective, groups)
    plan = build_plan(stats, solution, budget=6.0, objective=objective,
                      group_rules=list(solve.DEFAULT_GROUP_RULES), groups=groups, notes=[NOTE])
    plan.stage_seconds = {**plan.stage_seconds, "solve": 0.05}
    plan.cache_key = "k1"
    return plan


@pytest.fixture(scope="module")
def plan() -> Plan:
    return hand_plan()


@pytest.fixture(scope="module")
def page(plan) -> str:
    return render_report(plan)


@pytest.fixture(scope="module")
def plan_file(plan, tmp_path_factory) -> Path:
    return plan.save(tmp_path_factory.mktemp("report") / "plan.json")


class Checker(HTMLParser):
    """Checks that every end tag closes the innermost open element; collects ids and text."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.svg_ids: list[str] = []
        self.text: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "svg":
            self.svg_ids.append(attributes.get("id") or "")
        for key in ("src", "href", "xlink:href"):
            if attributes.get(key):
                self.urls.append(attributes[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        for key in ("src", "href", "xlink:href"):
            if dict(attrs).get(key):
                self.urls.append(dict(attrs)[key])

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Checker:
    checker = Checker()
    checker.feed(page)
    checker.close()
    return checker


def test_page_is_well_formed_with_one_svg_per_chart(page):
    checker = parse(page)
    assert checker.problems == [] and checker.stack == []
    assert page.startswith("<!DOCTYPE html>")
    assert sorted(checker.svg_ids) == sorted(CHARTS)


def test_page_names_every_layer_dropped_reason_and_total(plan, page):
    text = "".join(parse(page).text)
    for name in plan.layers:
        assert name in text
    assert SHAPE_REASON in text and SQNR_REASON in text
    assert f"{plan.totals.effective_bits:.3f}" in text and f"{plan.totals.score:.4g}" in text
    for stage in plan.stage_seconds:
        assert stage in text
    assert "probes" in text and "test cpu" in text


def test_dropped_cells_are_marked_in_the_heatmap(page):
    heatmap = re.search(r'<svg id="chart-sensitivity".*?</svg>', page, re.S).group(0)
    assert "model.layers.2.self_attn.v_proj / int4_g64: dropped: " + SQNR_REASON in heatmap
    assert "model.layers.0.self_attn.o_proj / int4_g128: dropped: " + SHAPE_REASON in heatmap


def test_text_from_the_plan_is_escaped(page):
    assert "<b>markup</b>" not in page and "&lt;b&gt;markup&lt;/b&gt; &amp; an ampersand" in page
    assert "TinyLlama<test>" not in page and "TinyLlama&lt;test&gt;" in page


def test_page_needs_no_network(page):
    checker = parse(page)
    assert checker.urls == []
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_budget_curve_is_monotone_in_bits(plan):
    for objective in ("balanced", "accuracy"):
        curve = budget_curve(resolve(plan, objective=objective))
        budgets = [p.budget for p in curve.points]
        assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
        assert 2 <= len(budgets) <= BUDGET_POINTS
        assert budgets[0] == pytest.approx(curve.smallest) and budgets[-1] == 16.0
        assert all(p.effective_bits <= p.budget + 1e-9 for p in curve.points)
        scores = [p.score for p in curve.points]
        assert all(b <= a + 1e-9 for a, b in zip(scores, scores[1:], strict=False)), (objective, scores)
        with pytest.raises(solve.InfeasibleBudget):
            resolve(plan, effective_bits=curve.smallest - 0.01)


def test_budget_curve_stops_solving_when_time_is_up(plan):
    curve = budget_curve(plan, points=16, seconds=0.0)
    assert len(curve.points) == 2 and curve.requested == 16  # the two ends: smallest, then 16 bits
    assert [p.budget for p in curve.points] == [curve.smallest, 16.0]
    assert "coarser than asked" in render_report(plan, curve_seconds=0.0)


def test_a_plan_with_hundreds_of_layers_renders_quickly(plan):
    """504 layers: thin heatmap rows (the chosen format a tick, not an outline), every name still
    on the page (the layer table); the curve limited to its two ends so only drawing is timed."""
    import time

    stats = plan.stats()
    layers = {}
    for block in range(42):
        for name, layer in stats.layers.items():
            layers[name.replace("layers.", f"layers.{block}.", 1)] = layer
    stats = stats.model_copy(update={"layers": layers})
    groups = solve.group_layers(stats.layers)
    big = build_plan(stats, solve.solve(stats.costs(), 6.0, "accuracy", groups), budget=6.0,
                     objective="accuracy", group_rules=list(solve.DEFAULT_GROUP_RULES), groups=groups)
    start = time.perf_counter()
    page = render_report(big, curve_seconds=0.0)
    assert time.perf_counter() - start < 10
    checker = parse(page)
    assert checker.problems == [] and sorted(checker.svg_ids) == sorted(CHARTS)
    text = "".join(checker.text)
    assert all(name in text for name in big.layers)


def test_a_plan_that_quantizes_nothing_still_renders(plan):
    """Every format dropped everywhere: one budget (16 bits), nothing to plot but the page is whole."""
    stats = plan.stats()
    layers = {name: layer.model_copy(update={
        "bits": {"none": 16.0}, "latency": {"none": layer.latency["none"]}, "sensitivity": {"none": 0.0},
        "dropped": {fmt: "no kernel on this machine" for fmt in BITS if fmt != "none"}})
        for name, layer in stats.layers.items()}
    stats = stats.model_copy(update={"layers": layers})
    groups = solve.group_layers(stats.layers)
    # 16.001: the solver's safety margin makes exactly 16 bits infeasible when 16 is the only choice
    none = build_plan(stats, solve.solve(stats.costs(), 16.001, "balanced", groups), budget=16.001,
                      objective="balanced", group_rules=list(solve.DEFAULT_GROUP_RULES), groups=groups)
    assert len(budget_curve(none).points) == 1
    checker = parse(render_report(none))
    assert checker.problems == [] and sorted(checker.svg_ids) == sorted(CHARTS)
    assert "no kernel on this machine" in "".join(checker.text)


def test_cli_writes_the_report(plan_file, tmp_path):
    out = tmp_path / "sub" / "report.html"
    result = runner.invoke(app, ["plan", "report", str(plan_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert sorted(parse(out.read_text(encoding="utf-8")).svg_ids) == sorted(CHARTS)


def test_cli_fails_cleanly_on_a_missing_or_bad_plan(tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["plan", "report", str(tmp_path / "nope.json"), "--out", str(out)])
    assert result.exit_code == 1 and "no plan at" in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["plan", "report", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and "invalid JSON" in result.output
    assert not out.exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make setup installs Debian's "
                                              "chromium); the headless-browser check is skipped")
def test_page_renders_in_headless_chromium(page, tmp_path):
    html_file = tmp_path / "report.html"
    html_file.write_text(page, encoding="utf-8")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--enable-logging=stderr", "--v=0", "--window-size=1400,2400",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    rendered = subprocess.run([*flags, f"--screenshot={shot}", html_file.as_uri()], capture_output=True,
                              text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, rendered.stderr[-2000:]
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    dom = subprocess.run([*flags, "--dump-dom", html_file.as_uri()], capture_output=True, text=True, timeout=120)
    checker = parse(dom.stdout)
    assert sorted(checker.svg_ids) == sorted(CHARTS), dom.stderr[-2000:]
    assert "model.layers.2.self_attn.o_proj" in "".join(checker.text)
