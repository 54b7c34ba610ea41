"""Pipeline schedules (per-stage op orders) and timeline export (Chrome trace, Gantt figure)."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from workbench.costmodel.pipeline import own_core_pipeline_s
from workbench.simulator.schedules import (Op, dependencies, peak_in_flight, stage_and_chunk,
                                           stage_order, virtual_stage, warmup_forwards)
from workbench.simulator.trace import (CATEGORIES, TimelineEvent, chrome_trace, gantt_figure,
                                       save_chrome_trace)


def ops(text: str) -> list[Op]:
    """'F0.0 B1.0' -> [Op('F', 0, 0), Op('B', 1, 0)]: kind, microbatch '.' chunk."""
    out = []
    for token in text.split():
        mb, chunk = token[1:].split(".")
        out.append(Op(token[0], int(mb), int(chunk)))
    return out


def simulate(schedule: str, pp: int, vpp: int, m: int, f_s: float, b_s: float) -> float:
    """Makespan of every stage's order with fixed op times (`f_s`, `b_s` per chunk's op):
    the cost model's replay (`own_core_pipeline_s`, which takes a microbatch's time through
    all of a stage's chunks). Raises if some stage can never go on (deadlock)."""
    span = own_core_pipeline_s([[f_s * vpp]] * pp, [[b_s * vpp]] * pp, m, vpp, schedule)
    return float(span[0])


# -- hand-written orders ------------------------------------------------------------------
def test_gpipe_pp2_m3():
    # all forwards, then all backwards in ascending microbatch order, on every stage
    expected = ops("F0.0 F1.0 F2.0 B0.0 B1.0 B2.0")
    assert stage_order("gpipe", 0, 2, 1, 3) == expected
    assert stage_order("gpipe", 1, 2, 1, 3) == expected


def test_1f1b_pp4_m8():
    # stage 0: warm-up pp - 0 - 1 = 3 forwards, 5 F/B pairs, 3 cool-down backwards
    assert stage_order("1f1b", 0, 4, 1, 8) == ops(
        "F0.0 F1.0 F2.0  F3.0 B0.0 F4.0 B1.0 F5.0 B2.0 F6.0 B3.0 F7.0 B4.0  B5.0 B6.0 B7.0")
    # stage 3 (last): no warm-up, strict alternation
    assert stage_order("1f1b", 3, 4, 1, 8) == ops(
        "F0.0 B0.0 F1.0 B1.0 F2.0 B2.0 F3.0 B3.0 F4.0 B4.0 F5.0 B5.0 F6.0 B6.0 F7.0 B7.0")


def test_1f1b_fewer_microbatches_than_stages():
    # pp=4, m=2, stage 0: warm-up min(3, 2) = 2 forwards, no steady state, 2 backwards
    assert stage_order("1f1b", 0, 4, 1, 2) == ops("F0.0 F1.0 B0.0 B1.0")


def test_interleaved_pp2_vpp2_m4():
    # total = m * vpp = 8 virtual microbatches. Forward k: chunk (k // 2) % 2,
    # microbatch (k // 4) * 2 + k % 2 -> k=0..7: (0,c0) (1,c0) (0,c1) (1,c1) (2,c0) (3,c0) (2,c1) (3,c1).
    # Backward k: chunk 1 - (k // 2) % 2, same microbatch ->
    # (0,c1) (1,c1) (0,c0) (1,c0) (2,c1) (3,c1) (2,c0) (3,c0).
    # stage 0 warm-up: (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, then 4 F/B pairs, 4 backwards
    assert stage_order("interleaved-1f1b", 0, 2, 2, 4) == ops(
        "F0.0 F1.0 F0.1 F1.1  F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0  B2.1 B3.1 B2.0 B3.0")
    # stage 1 warm-up: 0 * 2 + 1 * 2 = 2 forwards, then 6 F/B pairs, 2 backwards
    assert stage_order("interleaved-1f1b", 1, 2, 2, 4) == ops(
        "F0.0 F1.0  F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1  B2.0 B3.0")


# -- properties over many shapes ----------------------------------------------------------
CASES = ([("gpipe", pp, 1, m) for pp in (1, 2, 4) for m in (1, 3, 8)]
         + [("1f1b", pp, 1, m) for pp in (1, 2, 4, 8) for m in (1, 3, 8, 16)]
         + [("interleaved-1f1b", pp, vpp, m) for pp in (1, 2, 4) for vpp in (2, 3)
            for m in (pp, 2 * pp, 4 * pp)])


@pytest.mark.parametrize("schedule,pp,vpp,m", CASES)
def test_every_op_once_and_backward_after_forward(schedule, pp, vpp, m):
    everything = Counter(Op(k, mb, c) for k in "FB" for mb in range(m) for c in range(vpp))
    for s in range(pp):
        order = stage_order(schedule, s, pp, vpp, m)
        assert Counter(order) == everything
        position = {op: i for i, op in enumerate(order)}
        for mb in range(m):
            for c in range(vpp):
                assert position[Op("B", mb, c)] > position[Op("F", mb, c)]
        # warm-up forwards, then (if any forwards are left) one more forward, then a backward
        warmup = warmup_forwards(schedule, s, pp, vpp, m)
        first_b = next(i for i, op in enumerate(order) if op.kind == "B")
        assert first_b == (warmup + 1 if warmup < m * vpp else warmup)


@pytest.mark.parametrize("schedule,pp,vpp,m", CASES)
def test_no_deadlock(schedule, pp, vpp, m):
    simulate(schedule, pp, vpp, m, 1.0, 2.0)


def test_warmup_lengths():
    assert [warmup_forwards("1f1b", s, 4, 1, 8) for s in range(4)] == [3, 2, 1, 0]  # pp - s - 1
    assert [warmup_forwards("1f1b", s, 4, 1, 2) for s in range(4)] == [2, 2, 1, 0]  # min(., m=2)
    assert [warmup_forwards("gpipe", s, 4, 1, 8) for s in range(4)] == [8, 8, 8, 8]
    # interleaved pp=4 vpp=2 m=8: (4 - s - 1) * 2 + (2 - 1) * 4 = 10, 8, 6, 4
    assert [warmup_forwards("interleaved-1f1b", s, 4, 2, 8) for s in range(4)] == [10, 8, 6, 4]
    # pp=4 vpp=2 m=4: stage 0 wants 10 but total is 4 * 2 = 8: all forwards first
    assert warmup_forwards("interleaved-1f1b", 0, 4, 2, 4) == 8


def test_peak_in_flight():
    # 1F1B: warm-up + 1 = pp - s microbatches held; GPipe: all m
    assert [peak_in_flight(stage_order("1f1b", s, 4, 1, 8)) for s in range(4)] == [4, 3, 2, 1]
    assert peak_in_flight(stage_order("gpipe", 0, 4, 1, 8)) == 8
    # interleaved pp=2 vpp=2 m=4 stage 0: 4 warm-up forwards + 1 = 5 (microbatch, chunk) pairs
    assert peak_in_flight(stage_order("interleaved-1f1b", 0, 2, 2, 4)) == 5


# -- makespans ----------------------------------------------------------------------------
def test_1f1b_and_gpipe_makespan():
    # (m + pp - 1) * (F + B) = (8 + 4 - 1) * (1 + 2) = 33 for both: same bubble
    assert simulate("1f1b", 4, 1, 8, 1.0, 2.0) == 33.0
    assert simulate("gpipe", 4, 1, 8, 1.0, 2.0) == 33.0


def test_interleaved_makespan_bubble_shrinks_by_vpp():
    # Per chunk F = B = 0.5, so a stage's whole forward and backward take 1 each.
    # Busy time per stage: m * vpp * (F + B) = 8 * 2 * 1 = 16; bubble (Narayanan et al. 2021,
    # Sec. 2.2): (pp - 1) * (F + B) per chunk = 3 * 1 = 3 -> makespan 19.
    assert simulate("interleaved-1f1b", 4, 2, 8, 0.5, 0.5) == 19.0
    # Same work without interleaving (F = B = 1 per stage): (8 + 3) * 2 = 22, bubble 6 = 2 x 3
    assert simulate("1f1b", 4, 1, 8, 1.0, 1.0) == 22.0
    # F = 0.5, B = 1 per chunk: 16 * 1.5 + 3 * 1.5 = 28.5 against 33 for 1F1B (bubble 4.5 vs 9)
    assert simulate("interleaved-1f1b", 4, 2, 8, 0.5, 1.0) == 28.5


# -- virtual stages and dependencies ------------------------------------------------------
def test_virtual_stage_round_trip():
    assert virtual_stage(1, 1, 4) == 5  # chunk 1 * pp 4 + stage 1
    assert stage_and_chunk(5, 4) == (1, 1)
    assert [virtual_stage(s, c, 2) for c in range(2) for s in range(2)] == [0, 1, 2, 3]


def test_dependencies():
    # pp=2 vpp=2: virtual stages 0 (s0 c0), 1 (s1 c0), 2 (s0 c1), 3 (s1 c1)
    assert dependencies(Op("F", 3, 0), 0, 2, 2) == []
    assert dependencies(Op("F", 3, 1), 0, 2, 2) == [(1, Op("F", 3, 0))]  # v2 <- v1
    assert dependencies(Op("B", 3, 1), 1, 2, 2) == [(1, Op("F", 3, 1))]  # last virtual stage
    assert dependencies(Op("B", 3, 0), 1, 2, 2) == [(1, Op("F", 3, 0)), (0, Op("B", 3, 1))]
    assert dependencies(Op("B", 0, 0), 0, 1, 1) == [(0, Op("F", 0, 0))]


def test_op_label():
    assert Op("F", 3, 0).label == "F mb3 c0"


# -- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [
    (("zb-v", 0, 4, 1, 8), "schedule must be one of"),
    (("1f1b", 4, 4, 1, 8), "stage must be in 0..pp-1"),
    (("1f1b", -1, 4, 1, 8), "stage must be >= 0"),
    (("1f1b", 0, 0, 1, 8), "pp must be >= 1"),
    (("1f1b", 0, 4, 0, 8), "vpp must be >= 1"),
    (("1f1b", 0, 4, 1, 0), "m must be >= 1"),
    (("1f1b", 0, 4, 2, 8), "vpp must be 1 for '1f1b'"),
    (("gpipe", 0, 4, 2, 8), "vpp must be 1 for 'gpipe'"),
    (("interleaved-1f1b", 0, 4, 1, 8), "vpp must be >= 2"),
    (("interleaved-1f1b", 0, 4, 2, 6), "m (6) must be divisible by pp (4)"),
    (("1f1b", 0, 4, 1, 2.0), "m must be an int"),
])
def test_bad_schedule_inputs(args, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        stage_order(*args)


def test_bad_dependency_inputs():
    with pytest.raises(ValueError, match="op.chunk must be in 0..vpp-1"):
        dependencies(Op("F", 0, 2), 0, 2, 2)
    with pytest.raises(ValueError, match="op.kind must be 'F' or 'B'"):
        dependencies(Op("W", 0, 0), 0, 2, 1)


# -- Chrome trace -------------------------------------------------------------------------
def tiny() -> list[TimelineEvent]:
    return [
        TimelineEvent(0, "F mb0 c0", "compute", 0.0, 0.002),
        TimelineEvent(0, "TP all_reduce", "comm", 0.001, 0.0015, level="node", args={"bytes": 1024}),
        TimelineEvent(1, "F mb0 c0", "compute", 0.0025, 0.004),
    ]


def test_chrome_trace_exact():
    trace = chrome_trace(tiny(), process_names={0: "stage 0"})
    assert trace == {"displayTimeUnit": "ms", "traceEvents": [
        # pid = rank + 1 (Perfetto reserves pid 0); rank 1 keeps the default name
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "stage 0"}},
        {"name": "process_sort_index", "ph": "M", "pid": 1, "tid": 0, "args": {"sort_index": 0}},
        {"name": "process_name", "ph": "M", "pid": 2, "tid": 0, "args": {"name": "rank 1"}},
        {"name": "process_sort_index", "ph": "M", "pid": 2, "tid": 0, "args": {"sort_index": 1}},
        # tid: compute 1, comm 2
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "compute"}},
        {"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": 1, "args": {"sort_index": 0}},
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "comm"}},
        {"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": 2, "args": {"sort_index": 1000}},
        {"name": "thread_name", "ph": "M", "pid": 2, "tid": 1, "args": {"name": "compute"}},
        {"name": "thread_sort_index", "ph": "M", "pid": 2, "tid": 1, "args": {"sort_index": 0}},
        # 0 s -> 0 us, 2 ms = 2000 us; 1 ms -> 1000 us, 0.5 ms = 500 us; 2.5 ms -> 2500 us, 1500 us
        {"name": "F mb0 c0", "cat": "compute", "ph": "X", "ts": 0.0, "dur": 2000.0, "pid": 1,
         "tid": 1, "args": {}},
        {"name": "TP all_reduce", "cat": "comm", "ph": "X", "ts": 1000.0, "dur": 500.0, "pid": 1,
         "tid": 2, "args": {"bytes": 1024, "level": "node"}},
        {"name": "F mb0 c0", "cat": "compute", "ph": "X", "ts": 2500.0, "dur": 1500.0, "pid": 2,
         "tid": 1, "args": {}},
    ]}
    assert json.loads(json.dumps(trace)) == trace


def test_chrome_trace_spreads_partly_overlapping_events_over_lanes():
    events = [TimelineEvent(0, "DP bucket 0", "comm", 0.0, 0.003),
              TimelineEvent(0, "TP all_reduce", "comm", 0.001, 0.004),  # overlaps bucket 0
              TimelineEvent(0, "DP bucket 1", "comm", 0.003, 0.005)]    # starts as bucket 0 ends
    trace = chrome_trace(events)["traceEvents"]
    tids = [e["tid"] for e in trace if e["ph"] == "X"]
    assert tids == [2, 6, 2]  # comm lane 2; second lane 2 + len(CATEGORIES) = 6
    names = {e["tid"]: e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    assert names == {2: "comm", 6: "comm #2"}


def test_save_chrome_trace(tmp_path):
    save_chrome_trace(tiny(), tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == chrome_trace(tiny())
    save_chrome_trace(tiny(), tmp_path / "t.json.gz", process_names={1: "last"})
    with gzip.open(tmp_path / "t.json.gz", "rt") as f:
        assert json.load(f) == chrome_trace(tiny(), {1: "last"})


def test_timeline_event_validation():
    with pytest.raises(ValueError, match=r"end_s \(0.001\) must be >= start_s \(0.002\)"):
        TimelineEvent(0, "x", "compute", 0.002, 0.001)
    with pytest.raises(ValueError, match="category must be one of"):
        TimelineEvent(0, "x", "compue", 0.0, 1.0)
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        TimelineEvent(-1, "x", "compute", 0.0, 1.0)
    with pytest.raises(ValueError, match="must be finite"):
        TimelineEvent(0, "x", "compute", 0.0, float("nan"))
    with pytest.raises(ValueError, match="process_names: keys must be ranks"):
        chrome_trace(tiny(), {-1: "x"})
    ev = TimelineEvent(0, "x", "compute", 0.0, 1.0, args={"a": 1})
    assert hash(ev) == hash(TimelineEvent(0, "x", "compute", 0.0, 1.0, args={"a": 2}))
    assert ev.duration_s == 1.0


# -- Gantt figure -------------------------------------------------------------------------
def test_gantt_one_trace_per_category():
    events = tiny() + [TimelineEvent(1, "optimizer step", "optimizer", 0.004, 0.005)]
    fig = gantt_figure(events, title="step", process_names={0: "stage 0"})
    assert [t.name for t in fig.data] == ["compute", "comm", "optimizer"]  # CATEGORIES order
    assert [len(t.x) for t in fig.data] == [2, 1, 1]
    compute = fig.data[0]
    assert compute.orientation == "h"
    assert list(compute.y) == ["stage 0", "rank 1"]
    assert list(compute.base) == [0.0, 2.5]  # ms
    assert list(compute.x) == [2.0, 1.5]     # durations in ms
    assert fig.data[1].customdata[0][4] == "node"  # level in the hover
    assert fig.layout.xaxis.type == "linear" and fig.layout.yaxis.type == "category"
    assert list(fig.layout.yaxis.categoryarray) == ["stage 0", "rank 1"]
    assert fig.layout.title.text == "step"


def test_gantt_many_events():
    # 8 ranks x 6,250 events = 50,000 events -> still one trace per category
    events = [TimelineEvent(r, f"F mb{i}", CATEGORIES[i % 2], i * 1e-3, i * 1e-3 + 5e-4)
              for r in range(8) for i in range(6250)]
    fig = gantt_figure(events)
    assert [(t.name, len(t.x)) for t in fig.data] == [("compute", 25000), ("comm", 25000)]
    assert len(chrome_trace(events)["traceEvents"]) == 50000 + 8 * 2 + 8 * 2 * 2
