"""The Planner alone: a network spec and a latency table built in memory, no model, no torch."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from _tables import mac_table

from pipeline.backends.timing import Measurement
from pipeline.errors import HalpError, InfeasibleBudget, NotCoupled
from pipeline.lut import LatencyTable, plan
from pipeline.planner import Planner
from pipeline.spec import ChannelGroup, LayerSpec, NetworkSpec

Price = Callable[[int, int], float]


def _layer(name: str, op: str, cin: int, cout: int, sources: list[tuple[int | None, int]],
           out_group: int | None, kernel: int = 3) -> LayerSpec:
    return LayerSpec(name=name, op=op, kernel=(kernel, kernel), stride=(1, 1),
                     padding=(kernel // 2, kernel // 2), dilation=(1, 1),
                     groups=cout if op == "dwconv" else 1, in_hw=(8, 8), out_hw=(8, 8),
                     cin=cin, cout=cout, in_group=sources[0][0] if len(sources) == 1 else None,
                     out_group=out_group, in_sources=sources)


#: stem -> group 0 (32) -> mid -> group 1 (48, with a depthwise layer) -> head -> output;
#: "side" holds 16 of group 3's 24 channels (a concatenation), so group 3 cannot be sized
SPEC = NetworkSpec(
    input_shape=(1, 3, 8, 8),
    layers=[_layer("stem", "conv", 3, 32, [(None, 3)], 0),
            _layer("mid", "conv", 32, 48, [(0, 32)], 1, kernel=1),
            _layer("dw", "dwconv", 48, 48, [(1, 48)], 1),
            _layer("head", "conv", 48, 16, [(1, 48)], None, kernel=5),
            _layer("side", "conv", 3, 16, [(None, 3)], 3, kernel=7)],
    groups=[ChannelGroup(0, 32, ["stem"], ["mid"], []),
            ChannelGroup(1, 48, ["mid", "dw"], ["dw", "head"], []),
            ChannelGroup(2, 16, ["head"], [], [], prunable=False, reason="reaches the output"),
            ChannelGroup(3, 24, ["side"], [], [])],
    total_params=0, total_macs=0,
)
CONSTANT_MS = 0.05


def _plane(cin: float, cout: float) -> float:
    """Bilinear and increasing in both counts: a well-behaved table."""
    return 0.01 + 1e-4 * cin + 2e-4 * cout + 1e-6 * cin * cout


def _table(prices: dict[str, Price] | None = None) -> LatencyTable:
    """A table holding ``prices[layer]`` (default :func:`_plane`) at the points a build with
    step 8 measures, as a build would store it."""
    entries = plan(SPEC, 8)
    for entry in entries.values():
        f = (prices or {}).get(entry.layers[0], _plane)
        entry.points = {k: Measurement(f(*k), f(*k), f(*k), 5) for k in entry.points}
    return LatencyTable({"backend": "onnxruntime", "step": 8}, entries, constant_ms=CONSTANT_MS)


def _saliency(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {0: rng.random(32), 1: rng.random(48)}


def _expected_ms(counts: dict[int, int]) -> float:
    """The network by hand: each layer at its true (cin, cout), plus the constant."""
    c0, c1 = counts[0], counts[1]
    dims = [(3, c0), (c0, c1), (c1, c1), (c1, 16), (3, 16)]
    return sum(_plane(*d) for d in dims) + CONSTANT_MS


def test_groups_units_dense_and_minimum() -> None:
    planner = Planner(SPEC, _table())
    assert planner.groups == [0, 1] and planner.unsized == {3: ["side"]}
    assert planner.units == {0: 8, 1: 8}
    assert planner.choices[0].tolist() == [0, 8, 16, 24, 32]
    assert planner.dense_ms == pytest.approx(_expected_ms({0: 32, 1: 48}), rel=1e-12)
    assert planner.minimum_ms == pytest.approx(_expected_ms({0: 8, 1: 8}), rel=1e-12)
    coarse = Planner(SPEC, _table(), unit={1: 16})
    assert coarse.units == {0: 8, 1: 16} and coarse.choices[1].tolist() == [0, 16, 32, 48]
    with pytest.raises(HalpError, match=r"names groups \[3\] that are not prunable"):
        Planner(SPEC, _table(), unit={3: 8})


def test_schedule_is_exponential_and_ends_at_the_target() -> None:
    planner = Planner(SPEC, _table())
    target = planner.minimum_ms
    budgets = planner.schedule(target, 3)
    ratio = target / planner.dense_ms
    assert budgets[:2] == pytest.approx([planner.dense_ms * ratio ** (s / 3) for s in (1, 2)])
    assert budgets[-1] == target and budgets == sorted(budgets, reverse=True)
    assert planner.schedule(2.0, 2, start_ms=1.0) == pytest.approx([math.sqrt(2), 2.0])
    with pytest.raises(HalpError, match="steps=0"):
        planner.schedule(target, 0)


def test_solve_fits_the_budget_by_true_prediction() -> None:
    planner = Planner(SPEC, _table())
    saliency = _saliency()
    for budget in np.linspace(planner.minimum_ms, planner.dense_ms, 15):
        result = planner.solve(saliency, budget)
        assert result.predicted_ms <= budget
        assert result.predicted_ms == pytest.approx(_expected_ms(result.counts), rel=1e-12)
        for g, count in result.counts.items():
            assert count in planner.choices[g] and count >= 8
            kept = result.keep[g]
            assert len(kept) == count and np.all(np.diff(kept) > 0)
            # the best channels are the ones kept
            assert saliency[g][kept].min() >= np.delete(saliency[g], kept).max(initial=0)
        assert result.value == pytest.approx(
            sum(saliency[g][k].sum() for g, k in result.keep.items()))
    dense = planner.solve(saliency, planner.dense_ms)
    assert dense.counts == {0: 32, 1: 48} and dense.method == "exact"


def test_solve_is_optimal_when_the_knapsack_prices_exactly_so_more_budget_keeps_more() -> None:
    """Layers priced by their output count alone: the knapsack's costs are the true ones, so
    one step finds the best architecture (to the solver's resolution: 0.1% of the usable
    budget). With input-dependent prices one step over-prices inputs at today's counts and
    can keep less than a smaller budget would; the pruner's schedule takes small steps."""
    planner = Planner(SPEC, _table(dict.fromkeys(("stem", "mid", "dw", "head", "side"),
                                                 lambda ci, co: 0.01 + 3e-4 * co)))
    saliency = _saliency()
    options = [{0: a, 1: b} for a in range(8, 33, 8) for b in range(8, 49, 8)]

    def best(budget: float) -> float:
        return max(sum(np.sort(saliency[g])[::-1][:c].sum() for g, c in counts.items())
                   for counts in options if planner.predict(counts) <= budget)

    values = []
    for budget in np.linspace(planner.minimum_ms, planner.dense_ms, 15):
        result = planner.solve(saliency, budget)
        floor = budget - (budget - planner.minimum_ms) / 1000
        assert best(floor) - 1e-9 <= result.value <= best(budget) + 1e-9
        values.append(result.value)
    assert values == sorted(values)


def test_infeasible_budget_names_the_minimum() -> None:
    planner = Planner(SPEC, _table())
    with pytest.raises(InfeasibleBudget) as info:
        planner.solve(_saliency(), 0.99 * planner.minimum_ms)
    assert info.value.minimum == planner.minimum_ms
    assert f"{planner.minimum_ms:.4g} ms" in str(info.value)
    assert planner.check_target(planner.minimum_ms) == planner.minimum_ms


def test_tightening_and_greedy_fallback_when_pruning_an_input_costs_time() -> None:
    """The head gets slower as its input shrinks: the knapsack, pricing it at today's input,
    under-estimates, so the planner re-solves under a tightened budget or falls back."""
    planner = Planner(SPEC, _table({"head": lambda cin, cout: 0.01 + 3e-4 * (64 - cin)}))
    methods = set()
    for budget in np.linspace(planner.minimum_ms, planner.dense_ms, 25):
        result = planner.solve(_saliency(), budget, solver="decoupled")
        assert result.predicted_ms <= budget
        assert result.predicted_ms == planner.predict(result.counts)
        methods.add(result.method)
    assert {"tightened", "greedy"} <= methods


def test_steps_and_kept_channels_never_regrow() -> None:
    planner = Planner(SPEC, _table())
    saliency = _saliency()
    keep = {0: np.arange(0, 32, 2), 1: np.arange(24)}  # 16 and 24 channels left
    budget = (planner.minimum_ms + planner.predict({0: 16, 1: 24})) / 2
    for steps in (1, 4):
        result = planner.solve(saliency, budget, keep=keep, steps=steps)
        assert result.predicted_ms <= budget
        for g, kept in result.keep.items():
            assert set(kept.tolist()) <= set(keep[g].tolist())
    # a table pricing every smaller layer higher: nothing smaller fits, the channels stay
    slower = Planner(SPEC, _table(dict.fromkeys(("stem", "mid", "dw", "head", "side"),
                                                lambda ci, co: 1.0 - 1e-3 * ci - 2e-3 * co)))
    assert slower.minimum_ms == slower.dense_ms
    stuck = slower.solve(saliency, slower.dense_ms, keep=keep)
    assert stuck.method == "unchanged" and stuck.counts == {0: 16, 1: 24}


@pytest.mark.parametrize(("saliency", "match"), [
    ({0: np.ones(32)}, "group 1: none"),
    ({0: np.ones(32), 1: np.ones(8)}, r"group 1: shape \(8,\)"),
    ({0: np.ones(32), 1: -np.ones(48)}, "finite and >= 0"),
])
def test_saliency_is_checked(saliency: dict[int, np.ndarray], match: str) -> None:
    with pytest.raises(HalpError, match=match):
        Planner(SPEC, _table()).solve(saliency, 1.0)


def _best(planner: Planner, saliency: dict[int, np.ndarray], budget: float) -> float:
    """The best value within ``budget`` by true prediction, by enumeration."""
    ranked = {g: np.concatenate(([0.0], np.cumsum(np.sort(s)[::-1]))) for g, s in saliency.items()}
    return max(ranked[0][a] + ranked[1][b] for a in range(8, 33, 8) for b in range(8, 49, 8)
               if planner.predict({0: a, 1: b}) <= budget)


@pytest.mark.parametrize("prices", [None, {"head": lambda cin, cout: 0.01 + 3e-4 * (64 - cin)},
                                    {"mid": lambda cin, cout: 0.002 * cin * cout / 64}])
def test_coupled_is_optimal_and_never_below_decoupled(prices: dict[str, Price] | None) -> None:
    """The default solver prices the true network: the optimum within the budget (to its
    certified gap), at least the decoupled value, and HiGHS agrees."""
    planner = Planner(SPEC, _table(prices))
    saliency = _saliency(3)
    for budget in np.linspace(planner.minimum_ms, planner.dense_ms, 12):
        best = _best(planner, saliency, budget)
        result = planner.solve(saliency, budget)
        decoupled = planner.solve(saliency, budget, solver="decoupled")
        assert result.predicted_ms <= budget
        assert result.value >= decoupled.value
        assert best * (1 - (result.gap or 0)) - 1e-9 <= result.value <= best + 1e-9
        highs = planner.solve(saliency, budget, solver="highs")
        assert highs.predicted_ms <= budget and highs.value == pytest.approx(best, rel=1e-6)


def test_coupled_steps_track_the_schedule_and_never_regrow() -> None:
    planner = Planner(SPEC, _table())
    keep = {0: np.arange(0, 32, 2), 1: np.arange(24)}
    budget = (planner.minimum_ms + planner.predict({0: 16, 1: 24})) / 2
    result = planner.solve(_saliency(), budget, keep=keep, steps=3)
    assert result.predicted_ms <= budget
    assert all(set(k.tolist()) <= set(keep[g].tolist()) for g, k in result.keep.items())


def test_a_layer_over_three_groups_leaves_coupled_to_the_decoupled_answer() -> None:
    """"head" reads two sized groups and writes a third: no pairwise price for it, so the
    default solver answers as the decoupled one and HiGHS says why."""
    spec = NetworkSpec(
        input_shape=(1, 3, 8, 8),
        layers=[_layer("a", "conv", 3, 16, [(None, 3)], 0), _layer("b", "conv", 3, 16,
                                                                   [(None, 3)], 1),
                _layer("head", "conv", 32, 16, [(0, 16), (1, 16)], 2),
                _layer("out", "conv", 16, 8, [(2, 16)], None)],
        groups=[ChannelGroup(0, 16, ["a"], ["head"], []), ChannelGroup(1, 16, ["b"], ["head"], []),
                ChannelGroup(2, 16, ["head"], ["out"], [])],
        total_params=0, total_macs=0,
    )
    planner = Planner(spec, mac_table(spec))
    saliency = {g: np.random.default_rng(g).random(16) for g in range(3)}
    budget = (planner.minimum_ms + planner.dense_ms) / 2
    default = planner.solve(saliency, budget)
    decoupled = planner.solve(saliency, budget, solver="decoupled")
    assert default.counts == decoupled.counts and default.method != "coupled"
    with pytest.raises(NotCoupled, match="layer head reads or writes 3 sized channel groups"):
        planner.solve(saliency, budget, solver="highs")


def test_unknown_solver_is_refused() -> None:
    with pytest.raises(HalpError, match="solver 'exact' is not one of coupled, decoupled, highs"):
        Planner(SPEC, _table()).solve(_saliency(), 1.0, solver="exact")


def test_planner_imports_without_torch() -> None:
    code = ("import sys, pipeline.planner; "
            "assert not {'torch', 'torch_pruning'} & set(sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _streaming_table(ms: list[float]) -> LatencyTable:
    """:func:`_table` with a ladder for "mid": its time per copy at the working sets of a 32nd,
    a 16th, ... of the network's weights up to all of them is ``ms``, as a build stores it."""
    mid = SPEC.layer("mid")
    network = sum(layer.params_at(*layer.dims()) for layer in SPEC.layers)
    own = mid.params_at(*mid.dims())
    ladder = {"point": list(mid.dims()), "own": own,
              "params": [network >> k for k in range(5, -1, -1)], "ms": ms}
    table = _table()
    table.meta["streams"] = {"network": network, "entries": {
        mid.signature: {"fulls": [[own, *mid.dims()]], "anchors": [ladder]}}}
    return LatencyTable(table.meta, table.entries, constant_ms=CONSTANT_MS)


def test_a_heavy_layer_is_priced_in_the_working_set_of_its_network() -> None:
    """A point is timed in the working set of a network pruned to its width; in another
    network it costs its ladder's time there over its time in that one. A network pruned
    alike prices as the table stores it; a ladder made monotone first."""
    ms = [1.0, 1.0, 3.0, 2.0, 5.0, 10.0]  # one noisy rung: pooled with the next to 2.5
    table, plain = _streaming_table(ms), _table()
    mid = SPEC.layer("mid")
    network = table.streams.network
    assert table.predict(SPEC) == pytest.approx(plain.predict(SPEC))
    assert table.working_set(SPEC) == network and plain.working_set(SPEC) is None
    x = np.log([network >> k for k in range(5, -1, -1)])
    curve = [1.0, 1.0, 2.5, 2.5, 5.0, 10.0]
    for counts in ({0: 32, 1: 8}, {0: 8, 1: 48}, {0: 16, 1: 24}):
        params = table.working_set(SPEC, counts)
        assert params == sum(la.params_at(*la.dims(counts)) for la in SPEC.layers) < network
        cin, cout = mid.dims(counts)
        timed = math.ceil(network * cin * cout / (32 * 48))  # a uniform network of its width
        factor = np.interp(math.log(params), x, curve) / np.interp(math.log(timed), x, curve)
        priced = table.layer_latencies(SPEC, counts)
        assert priced["mid"] == pytest.approx(plain.latency(mid, cin, cout) * factor)
        assert priced["mid"] == pytest.approx(table.latency(mid, cin, cout, params))
        assert {k: v for k, v in priced.items() if k != "mid"} == \
            {k: v for k, v in plain.layer_latencies(SPEC, counts).items() if k != "mid"}
    # a network of the point's own width: as timed
    assert table.latency(mid, 16, 24, math.ceil(network / 4)) == \
        pytest.approx(plain.latency(mid, 16, 24))


def test_the_planner_solves_again_in_the_working_set_of_the_network_it_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """"mid" runs 2.2 times slower in the dense network's working set than in a 32nd of it (as
    alexnet's classifier layer at a quarter width did on an EPYC): priced in today's network
    alone, a step over-prunes; solved again in the working sets the bisection tries, it keeps
    more within the budget by true prediction, and never less."""
    planner = Planner(SPEC, _streaming_table([1.0, 1.0, 1.2, 1.6, 2.0, 2.2]))
    saliency = _saliency(3)
    gained = []
    for budget in np.linspace(planner.minimum_ms, planner.dense_ms, 12):
        result = planner.solve(saliency, budget)
        assert result.predicted_ms <= budget
        assert result.value <= _best(planner, saliency, budget) + 1e-9
        with monkeypatch.context() as patch:
            patch.setattr("pipeline.planner.WORKING_SET_SOLVES", 1)
            once = Planner(SPEC, planner.lut).solve(saliency, budget)
        assert once.predicted_ms <= budget and result.value >= once.value - 1e-9
        gained.append(result.value > once.value + 1e-9)
    assert any(gained)
