"""Benchmarks, pure parts: sweep limits naming the field, percentiles, CSV, capacity, the plot,
and placement choosing between two fake-capacity nodes by what was measured."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone

import pytest

from nexus.benchmarks.cells import Cell, best_per_node, failed_cell, percentile, to_csv
from nexus.benchmarks.sweep import MAX_CELLS, Sweep, SweepInvalid, check_model_length, check_size
from nexus.models.placement import PlacementRequest, Strategy, place
from nexus.nodes.fit import GpuView, NodeView
from nexus.nodes.states import NodeState
from nexus.queueing.routing import Requirements, route_for, vram_thresholds
from nexus.config import Settings
from nexus.queueing.tiers import Tier

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
SWEEP = {"model": "tiny", "batch_sizes": [4, 1], "context_lengths": [32, 128]}


def cell(node: str, batch: int, context: int, tok_s: float, errors: int = 0) -> Cell:
    return Cell(node, batch, context, context, batch, batch * 8, tok_s, 10.0, 20.0, 1.5, 300.0, "rss", errors)


# --- the request -------------------------------------------------------------------------------


def test_a_sweep_is_sorted_and_counts_its_cells():
    sweep = Sweep.from_dict(SWEEP)
    assert sweep.batch_sizes == (1, 4) and sweep.context_lengths == (32, 128)
    assert sweep.cells_per_node == 4
    assert sweep.pairs() == [(1, 32), (4, 32), (1, 128), (4, 128)]
    assert Sweep.from_dict(sweep.to_dict()) == sweep


@pytest.mark.parametrize("change, field", [
    ({"batch_sizes": []}, "batch_sizes"),
    ({"context_lengths": []}, "context_lengths"),
    ({"batch_sizes": [0]}, "batch_sizes"),
    ({"batch_sizes": [True]}, "batch_sizes"),
    ({"context_lengths": [1, 2_000_000]}, "context_lengths"),
    ({"context_lengths": list(range(1, 40))}, "context_lengths"),
    ({"output_tokens": 0}, "output_tokens"),
    ({"repetitions": 11}, "repetitions"),
    ({"model": "bad name!"}, "model"),
    ({"colour": "red"}, "colour"),
])
def test_bad_sweeps_name_the_field(change, field):
    with pytest.raises(SweepInvalid) as refused:
        Sweep.from_dict({**SWEEP, **change})
    assert refused.value.field == field


def test_a_sweep_is_capped_in_cells():
    sweep = Sweep.from_dict({**SWEEP, "batch_sizes": list(range(1, 17)), "context_lengths": list(range(1, 9))})
    check_size(sweep, 2)  # 2 x 16 x 8 = 256
    assert 2 * sweep.cells_per_node == MAX_CELLS
    with pytest.raises(SweepInvalid, match="257|384") as refused:
        check_size(sweep, 3)
    assert refused.value.field == "batch_sizes"
    with pytest.raises(SweepInvalid) as none:
        check_size(sweep, 0)
    assert none.value.field == "nodes"


def test_the_longest_prompt_and_the_output_must_fit_the_model():
    sweep = Sweep.from_dict({**SWEEP, "output_tokens": 16})
    check_model_length(sweep, 144)
    check_model_length(sweep, None)
    with pytest.raises(SweepInvalid) as refused:
        check_model_length(sweep, 143)
    assert refused.value.field == "context_lengths"


# --- cells ---------------------------------------------------------------------------------------


def test_percentiles_interpolate():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_the_csv_has_a_row_per_cell_and_empty_fields_for_none():
    cells = [cell("a", 1, 32, 12.5), failed_cell("b", 1, 32, "node went away")]
    rows = list(csv.DictReader(io.StringIO(to_csv(cells))))
    assert [r["node"] for r in rows] == ["a", "b"]
    assert rows[0]["output_tok_s"] == "12.5" and rows[1]["ttft_p50_ms"] == "" and rows[1]["errors"] == "1"
    assert Cell.from_dict(cells[0].to_dict()) == cells[0]


def test_a_nodes_capacity_is_its_fastest_cell_without_errors():
    best = best_per_node([cell("a", 1, 32, 10), cell("a", 4, 32, 30), cell("a", 8, 32, 50, errors=1),
                          cell("b", 1, 32, 5), failed_cell("c", 1, 32, "x")])
    assert {node: c.output_tok_s for node, c in best.items()} == {"a": 30, "b": 5}


def test_the_plot_is_a_png_with_a_panel_per_node():
    from nexus.benchmarks.plot import plot_png

    png = plot_png([cell(n, b, c, b * 10.0 + c) for n in ("a", "b", "c", "d") for b in (1, 4) for c in (32, 128)],
                   "tiny")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > height > 300  # 3 panels a row, two rows


# --- routing and placement -------------------------------------------------------------------------


def test_a_job_pinned_to_a_node_goes_to_that_nodes_queue():
    thresholds = vram_thresholds(Settings())
    assert route_for(Requirements.parse({"node": "dev-worker-1"}), thresholds) == "node.dev-worker-1"
    # The model on that node: its serving workers there (a benchmark of the running instance).
    assert route_for(Requirements.parse({"node": "w2", "model": "tiny"}), thresholds) == "node.w2.model.tiny"
    assert Requirements.parse({"node": "w2"}).to_dict() == {"node": "w2"}
    with pytest.raises(ValueError, match="requirements.node"):
        Requirements.parse({"node": "../etc"})


def _gpu_node(node_id: str, free_mb: int) -> NodeView:
    return NodeView(node_id, NodeState.READY, Tier.GPU_PEER, (GpuView(0, Tier.GPU_PEER, 24_000, free_mb),))


def _cpu_node(node_id: str) -> NodeView:
    return NodeView(node_id, NodeState.READY, Tier.CPU_ONLY, ())


def test_placement_prefers_the_fastest_measured_node_and_falls_back_to_vram():
    # Two nodes that both fit: "roomy" has more free VRAM, "quick" measured faster.
    nodes = [_gpu_node("roomy", 22_000), _gpu_node("quick", 16_000)]
    request = PlacementRequest(8_000, Tier.GPU_INFRA)
    assert place(request, nodes, [], NOW).head.node_id == "roomy"  # unmeasured: most free VRAM
    assert place(request, nodes, [], NOW, {"quick": 900.0, "roomy": 300.0}).head.node_id == "quick"
    assert place(request, nodes, [], NOW, {"quick": 100.0, "roomy": 300.0}).head.node_id == "roomy"
    assert place(request, nodes, [], NOW, {"quick": 50.0}).head.node_id == "quick"  # measured beats unmeasured
    # A measurement never makes a node fit: a model too big for "quick" still goes to "roomy".
    assert place(PlacementRequest(20_000, Tier.GPU_INFRA), nodes, [], NOW, {"quick": 900.0}).head.node_id == "roomy"


def test_cpu_placement_follows_the_measurement_too():
    nodes = [_cpu_node("cpu-a"), _cpu_node("cpu-b")]
    request = PlacementRequest(0, node_ids=frozenset({"cpu-a", "cpu-b"}))
    assert place(request, nodes, [], NOW).head.node_id == "cpu-a"
    plan = place(request, nodes, [], NOW, {"cpu-a": 120.0, "cpu-b": 480.0})
    assert plan.strategy is Strategy.CPU and plan.head.node_id == "cpu-b"


# --- measuring, against a scripted backend (the real one runs in the cluster test) ---------------


class ScriptedBackend:
    """Counts a prompt's tokens as 2 per word plus one; streams `tokens` deltas `gap` seconds apart."""

    def __init__(self, tokens: int = 5, gap: float = 0.01, fail_every: int = 0):
        self.tokens, self.gap, self.fail_every, self.calls = tokens, gap, fail_every, 0

    def _prompt_tokens(self, request) -> int:
        return 2 * len(request.prompt.split()) + 1

    def generate(self, request):
        from nexus.inference.types import Choice, FinishReason, GenerationResult, Usage

        return GenerationResult((Choice(0, "x", FinishReason.LENGTH),), Usage(self._prompt_tokens(request), 1))

    def stream(self, request):
        import time

        from nexus.inference.types import StreamDelta, Usage

        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("engine hiccup")
        for _ in range(min(self.tokens, request.params.max_tokens)):
            time.sleep(self.gap)
            yield StreamDelta(0, "tok")
        yield Usage(self._prompt_tokens(request), min(self.tokens, request.params.max_tokens))


def test_a_prompt_is_sized_in_the_models_tokens_never_past_the_target():
    from nexus.benchmarks.measure import sized_prompt

    prompt, counted = sized_prompt(ScriptedBackend(), 64)
    assert counted in (63, 64) and counted == 2 * len(prompt.split()) + 1


def test_a_cell_times_first_tokens_and_gaps_and_counts_errors():
    from nexus.benchmarks.measure import PeakMemory, measure_cell

    with PeakMemory() as memory:
        good = measure_cell(ScriptedBackend(tokens=5, gap=0.02), "n", 4, 32, "w " * 10, 21, 8, 2, memory)
        flaky = measure_cell(ScriptedBackend(fail_every=2), "n", 2, 32, "w", 3, 8, 1, memory)
    assert good.requests == 8 and good.output_tokens == 40 and good.errors == 0
    assert good.ttft_p50_ms >= 15 and good.ttft_p99_ms >= good.ttft_p50_ms
    assert 15 <= good.itl_p50_ms < 200
    assert good.output_tok_s > 0 and good.peak_memory_mb > 0 and good.memory_kind == "rss"
    assert flaky.errors == 1 and "engine hiccup" in flaky.error and flaky.output_tokens == 5
