"""The `workbench` command: thin argument parsing over tested library functions."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from . import costmodel, models


def si(value: float, unit: str = "") -> str:
    """Human form with an SI prefix: 8030261248 -> '8.03 G'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table: left-aligned text, right-aligned numbers."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) for r in rows) for c in columns]

    def fmt(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, str) and v[:1].isdigit())


def parse_set(text: str | None) -> dict[str, str]:
    """`layers=4,hidden=256` -> {'layers': '4', 'hidden': '256'} (values coerced later)."""
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def model_rows() -> list[dict[str, Any]]:
    """One row per flavour: family, parameters, forward FLOPs per sample, source."""
    rows = []
    for name, flavour in sorted(models.flavours().items(), key=lambda kv: (kv[1].family, kv[0])):
        g = costmodel.graph(flavour.config, batch=1)
        rows.append({"model": name, "family": flavour.family, "params": g.params,
                     "fwd_flops_per_sample": g.fwd_flops,
                     "counted_fwd_flops_per_sample": g.counted_fwd_flops,
                     "seq": g.seq, "source": flavour.source})
    return rows


def cmd_models(args) -> int:
    """`workbench models`: every model and flavour with parameters and FLOPs per sample."""
    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    pretty = [{"model": r["model"], "family": r["family"], "params": si(r["params"]),
               "fwd FLOP/sample": si(r["fwd_flops_per_sample"]),
               "seq": r["seq"] or "", "source": r["source"][:60]} for r in rows]
    print(table(pretty, ["model", "family", "params", "fwd FLOP/sample", "seq", "source"]))
    return 0


def cmd_graph(args) -> int:
    """`workbench graph MODEL`: the per-layer table of the analytic layer graph."""
    g = costmodel.graph(args.model, batch=args.batch, **parse_set(args.set))
    if args.json:
        print(json.dumps(g.to_json(), indent=1))
        return 0
    rows = [{"layer": l.name, "kind": l.kind, "unit": _unit_label(l.unit), "params": l.params,
             "fwd FLOP": si(l.fwd_flops), "bwd FLOP": si(l.bwd_flops),
             "saved": si(l.saved_bytes, "B"), "tp": l.tp} for l in g.layers]
    print(table(rows, ["layer", "kind", "unit", "params", "fwd FLOP", "bwd FLOP", "saved", "tp"]))
    s = g.summary()
    print(f"\n{s['model']}: {s['params']:,} parameters, {len(g.layers)} ops, {g.units} units; "
          f"batch {g.batch}{f' x seq {g.seq}' if g.seq else ''}: forward {si(g.fwd_flops, 'FLOP')}, "
          f"backward {si(g.bwd_flops, 'FLOP')}, saved activations {si(g.saved_bytes, 'B')}")
    return 0


def cmd_hardware(args) -> int:
    """`workbench hardware`: chip and cluster presets with their key figures."""
    from . import hardware

    names = hardware.list_presets()
    chips = [hardware.chip(n) if n != "cpu" else hardware.load_cpu_chip() for n in names["chips"]]
    clusters = [hardware.cluster(n) for n in names["clusters"]]
    if args.json:
        print(json.dumps({"chips": [hardware.chip_to_dict(c) for c in chips],
                          "clusters": [hardware.cluster_to_dict(c) for c in clusters]}, indent=1))
        return 0
    print(table([{"chip": c.name, **{f"{d} FLOP/s": si(v) for d, v in c.dense_flops_per_s.items()},
                  "memory": si(c.memory_bytes, "B"),
                  "mem bw": si(c.memory_bandwidth_Bps, "B/s")} for c in chips],
                ["chip", "bf16 FLOP/s", "fp8 FLOP/s", "fp32 FLOP/s", "memory", "mem bw"]))
    print()
    rows = []
    for cl in clusters:
        for lv in cl.levels:
            rows.append({"cluster": cl.name, "level": lv.name, "chips": lv.size,
                         "bw/chip/dir": si(lv.bandwidth_Bps, "B/s"),
                         "latency": f"{lv.latency_s * 1e6:.1f} us",
                         "oversub": lv.oversubscription})
    print(table(rows, ["cluster", "level", "chips", "bw/chip/dir", "latency", "oversub"]))
    return 0


def cmd_plan(args) -> int:
    """`workbench plan PLAN --model M --chips N`: validate a plan, show its mesh and stages."""
    from .plan import Plan
    from .stages import stage_flops, stage_units

    plan = Plan.parse(args.plan)
    g = costmodel.graph(args.model, batch=1, **parse_set(args.set))
    plan.validate(args.chips, g)
    print(f"plan     {plan}")
    print(f"mesh     {plan.mesh_shape} = {plan.world_size} chips")
    print(f"batch    {plan.global_batch_size} samples = {plan.dp_degree} DP ranks x "
          f"{plan.microbatches} microbatches x {plan.microbatch_size} samples")
    if plan.pp > 1:
        units = stage_units(g.units, plan.pp, plan.vpp)
        flops = stage_flops(g, plan)
        print(table([{"stage": i, "units": len(u), "first..last": f"{u[0]}..{u[-1]}",
                      "fwd+bwd FLOP/sample": si(f)} for i, (u, f) in enumerate(zip(units, flops))],
                    ["stage", "units", "first..last", "fwd+bwd FLOP/sample"]))
    return 0


def _cluster(args):
    from . import hardware
    return hardware.resolve_cluster(args.cluster, args.chips)


def _options(args):
    from .costmodel import CostOptions
    return CostOptions(**{k: (v.lower() == "true" if v.lower() in ("true", "false") else v)
                          for k, v in parse_set(args.options).items()})


def _graph_for(args):
    overrides = parse_set(args.set)
    if args.seq:
        overrides["seq"] = args.seq
    return costmodel.graph(args.model, batch=1, **overrides)


def cmd_estimate(args) -> int:
    """`workbench estimate`: one plan's memory, communication, step time and MFU."""
    from .plan import Plan
    plan = Plan.parse(args.plan)
    if args.dtype:
        import dataclasses
        plan = dataclasses.replace(plan, dtype=args.dtype)
    e = costmodel.estimate(_graph_for(args), plan, _cluster(args), _options(args))
    if args.json:
        print(json.dumps(e.to_json(), indent=1))
        return 0
    print(format_estimate(e))
    return 0


def format_estimate(e) -> str:
    """A human summary of an Estimate: throughput, MFU, time and memory breakdowns, comm."""
    m = e.memory
    lines = [f"{e.model} on {e.n_chips} x {e.cluster}, plan {e.plan}",
             f"step {e.step_time_s:.3f} s   {si(e.samples_per_s)} samples/s"
             + (f"   {si(e.tokens_per_s)} tokens/s" if e.tokens_per_s else "")
             + f"   MFU {100 * e.mfu:.1f}%   HFU {100 * e.hfu:.1f}%   "
               f"{e.model_tflops_per_chip:.1f} model TFLOP/s per chip", "",
             table([{"part": k.removesuffix("_s"), "seconds": f"{v:.4f}",
                     "share": f"{100 * v / e.step_time_s:.1f}%"}
                    for k, v in e.breakdown_s.items() if v > 0], ["part", "seconds", "share"]),
             "", f"memory per rank (stage {m.stage}): {si(m.peak_bytes, 'B')} of "
                 f"{si(m.capacity_bytes, 'B')} -> "
                 + ("fits" if m.fits else f"DOES NOT FIT (over by {si(m.over_by_bytes, 'B')})"),
             table([{"part": k, "bytes": si(getattr(m, f"{k}_bytes"), "B")}
                    for k in ("weights", "grads", "optimizer", "activations", "fsdp_buffer",
                              "framework")], ["part", "bytes"])]
    if e.comm:
        lines += ["", table([{"collective": c.name, "group": f"{c.group} x{c.group_size}",
                              "level": c.level, "bytes": si(c.bytes, "B"),
                              "per step": c.count_per_step, "each": f"{c.seconds * 1e3:.3f} ms"}
                             for c in e.comm],
                            ["collective", "group", "level", "bytes", "per step", "each"])]
    return "\n".join(lines)


def cmd_simulate(args) -> int:
    """`workbench simulate`: one step as discrete events; timeline to --trace."""
    import dataclasses

    from .plan import Plan
    from .simulator import simulate
    plan = Plan.parse(args.plan)
    if args.dtype:
        plan = dataclasses.replace(plan, dtype=args.dtype)
    speed = {int(k): float(v) for k, v in parse_set(args.speed).items()}
    r = simulate(_graph_for(args), plan, _cluster(args), _options(args), mode=args.mode,
                 speed=speed, record=bool(args.trace or args.gantt))
    if args.trace:
        r.save_trace(args.trace)
    if args.gantt:
        r.gantt().write_html(args.gantt, include_plotlyjs=True)
    if args.json:
        print(json.dumps(r.to_json(), indent=1))
        return 0
    print(f"{r.model} on {r.n_chips} x {r.cluster}, plan {r.plan} ({r.mode} simulation)")
    print(f"step {r.step_time_s:.3f} s (cost model {r.predicted_step_time_s:.3f} s, "
          f"{100 * (r.step_time_s / r.predicted_step_time_s - 1):+.1f}%)   MFU {100 * r.mfu:.1f}%   "
          f"{r.events:,} events in {r.wall_s:.2f} s")
    print()
    print(table([{"part": k.removesuffix("_s"), "seconds": f"{v:.4f}",
                  "share": f"{100 * v / r.step_time_s:.1f}%"}
                 for k, v in r.breakdown_s.items() if v > 0], ["part", "seconds", "share"]))
    busy = [u for u in r.link_utilisation if u["bytes"] > 0][:5]
    if busy:
        print()
        print(table([{"link": u["link"], "level": u["level"], "bytes": si(u["bytes"], "B"),
                      "busy": f"{100 * u['utilisation']:.1f}%"} for u in busy],
                    ["link", "level", "bytes", "busy"]))
    if args.trace:
        print(f"\ntimeline: {args.trace} (open in https://ui.perfetto.dev)")
    return 0


def cmd_run(args) -> int:
    """`workbench run`: train the plan for real and print measured beside predicted."""
    from .runner import run
    from .store import Store
    store = None if args.no_store else Store(args.store)
    out = run(args.model, args.plan, args.nproc, overrides=parse_set(args.set), steps=args.steps,
              min_timed_s=args.min_timed_s, device=args.device, store=store,
              timeout_s=args.timeout, cp_impl=args.cp_impl, probe=args.probe)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "comm_per_rank"}, indent=1,
                         default=str))
        return 0
    p = out["predicted"]
    rows = [("step time", f"{out['step_time_s'] * 1e3:.2f} ms", f"{p['step_time_s'] * 1e3:.2f} ms"),
            ("MFU", f"{100 * out['mfu']:.2f}%", f"{100 * p['mfu']:.2f}%"),
            ("model TFLOP/s per chip", f"{out['model_tflops_per_chip']:.4f}",
             f"{p['model_tflops_per_chip']:.4f}"),
            ("peak memory per rank", si(out["memory_peak_bytes"], "B"),
             si(p["memory"]["peak_bytes"] - p["memory"]["framework_bytes"], "B") + " (+ framework)")]
    print(f"{args.model}, plan {out['plan']}, {args.nproc} ranks on {out['device']}: "
          f"{len(out['step_times_s'])} steps (p10 {out['step_time_p10_s'] * 1e3:.2f} ms, "
          f"p90 {out['step_time_p90_s'] * 1e3:.2f} ms)")
    print(table([{"": a, "measured": b, "predicted": c} for a, b, c in rows],
                ["", "measured", "predicted"]))
    if "host_probe" in out:
        q = out["host_probe"]
        print(f"host probe (after each step): {q['matmul_s'] * 1e3:.3f} ms matmuls, "
              f"{q['small_ops_s'] * 1e3:.3f} ms small ops, index {q['index_s'] * 1e3:.3f} ms")
    predicted_bytes = {}
    for c in p["comm"]:
        predicted_bytes[c["kind"]] = predicted_bytes.get(c["kind"], 0) + c.get("bytes_per_step", 0)
    kinds = sorted(set(out["comm"]) | set(predicted_bytes))
    if kinds:
        print()
        print(table([{"collective": k, "measured bytes": out["comm"].get(k, {}).get("bytes", 0),
                      "calls": out["comm"].get(k, {}).get("calls", 0),
                      "predicted bytes": int(predicted_bytes.get(k, 0))} for k in kinds],
                    ["collective", "measured bytes", "calls", "predicted bytes"]))
    if out.get("sampler_message"):
        print(f"\n{out['sampler_message']}")
    if store is not None:
        print(f"\nstored as measurement {out['measurement_id']} (prediction "
              f"{out['prediction_id']}) in {store.path}")
    return 0


def cmd_search(args) -> int:
    """`workbench search`: every valid plan ranked by throughput; the top K that fit."""
    g = _graph_for(args)
    fixed = {k: (int(v) if v.isdigit() else v == "true" if v in ("true", "false") else v)
             for k, v in parse_set(args.fix).items()}
    result = costmodel.search(g, _cluster(args), args.chips, args.global_batch,
                              options=_options(args), dtype=args.dtype or "bf16",
                              fixed=fixed or None)
    top = result.top(args.top)
    if args.json:
        print(json.dumps({"evaluated": result.evaluated, "fit": int(len(result.ranking)),
                          "seconds": result.seconds, "top": top}, indent=1))
        return 0
    print(f"{result.evaluated:,} valid plans evaluated in {result.seconds:.2f} s "
          f"({result.evaluated / result.seconds:,.0f} plans/s); {len(result.ranking):,} fit memory")
    if not top:
        print("no plan fits: try more chips, a smaller batch or recompute=full")
        return 1
    rate = "tokens/s" if g.seq else "samples/s"
    print(table([{"#": i + 1, "plan": r["plan"], "step s": f"{r['step_time_s']:.3f}",
                  rate: si(r["tokens_per_s"] if g.seq else r["samples_per_s"]),
                  "MFU": f"{100 * r['mfu']:.1f}%", "memory": si(r["memory_peak_bytes"], "B")}
                 for i, r in enumerate(top)], ["#", "plan", "step s", rate, "MFU", "memory"]))
    return 0


def _unit_label(unit: int) -> str:
    from .costmodel.graph import POST_UNIT, PRE_UNIT
    return {PRE_UNIT: "pre", POST_UNIT: "post"}.get(unit, str(unit))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list every model and flavour")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)
    g = sub.add_parser("graph", help="per-layer table of a model's layer graph")
    g.add_argument("model", help="flavour name, e.g. llama3-8b (see `workbench models`)")
    g.add_argument("--set", help="config overrides, e.g. layers=4,hidden=256")
    g.add_argument("--batch", type=int, default=1, help="samples (default 1)")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=cmd_graph)
    h = sub.add_parser("hardware", help="chip and cluster presets")
    h.add_argument("--json", action="store_true", help="print JSON")
    h.set_defaults(func=cmd_hardware)
    pl = sub.add_parser("plan", help="validate a plan against a model and a world size")
    pl.add_argument("plan", help='compact plan, e.g. "dp=8,tp=8,pp=16,mb=1,gbs=1024"')
    pl.add_argument("--model", required=True, help="flavour name (see `workbench models`)")
    pl.add_argument("--set", help="model config overrides, e.g. layers=4")
    pl.add_argument("--chips", type=int, required=True, help="world size")
    pl.set_defaults(func=cmd_plan)
    for name, func, hlp in (("estimate", cmd_estimate, "predict one plan's step"),
                            ("simulate", cmd_simulate, "simulate one plan's step (SimPy)"),
                            ("search", cmd_search, "rank every valid plan")):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("--model", required=True, help="flavour name (see `workbench models`)")
        c.add_argument("--set", help="model config overrides, e.g. layers=96,hidden=12288")
        c.add_argument("--cluster", default="dgx-h100", help="preset or .toml/.json file")
        c.add_argument("--chips", type=int, required=True, help="chips in the cluster")
        c.add_argument("--seq", type=int, help="sequence length (overrides the model's)")
        c.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "fp8"), help="compute dtype")
        c.add_argument("--options", help="cost options, e.g. attention=unfused,overlap_dp=false")
        c.add_argument("--json", action="store_true", help="print JSON")
        if name in ("estimate", "simulate"):
            c.add_argument("--plan", required=True, help='e.g. "dp=8,tp=8,pp=4,mb=1,gbs=256"')
        if name == "simulate":
            c.add_argument("--trace", help="write the timeline as Chrome trace JSON (Perfetto)")
            c.add_argument("--gantt", help="write the timeline as a plotly Gantt HTML file")
            c.add_argument("--mode", choices=("symmetric", "full"), default="symmetric",
                           help="one rank per stage (default) or every rank (<= 64 chips)")
            c.add_argument("--speed", help="per-rank slowdowns, e.g. 3=1.2,17=1.5")
        if name == "search":
            c.add_argument("--global-batch", type=int, required=True, help="samples per step")
            c.add_argument("--top", type=int, default=10, help="plans to show (default 10)")
            c.add_argument("--fix", help="pin plan keys, e.g. tp=8,recompute=full")
        c.set_defaults(func=func)
    r = sub.add_parser("run", help="train a plan for real and measure it")
    r.add_argument("--model", required=True, help="flavour name (a tiny one on a CPU)")
    r.add_argument("--set", help="model config overrides")
    r.add_argument("--plan", required=True, help='e.g. "fsdp=2,gbs=8,dtype=fp32"')
    r.add_argument("--nproc", type=int, required=True, help="ranks (local processes)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    r.add_argument("--min-timed-s", type=float, default=0.0,
                   help="time at least this many seconds: more steps when --steps of the "
                        "warm-up step's length would be shorter (default 0)")
    r.add_argument("--probe", action="store_true",
                   help="time the host probe after every step on every rank (runner.host_probe: "
                        "how fast the host ran meanwhile)")
    r.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds")
    r.add_argument("--cp-impl", choices=("ring", "torch"), default="ring",
                   help="context-parallel attention: ours (ring) or PyTorch's (CUDA only)")
    r.add_argument("--store", help="SQLite store (default $WORKBENCH_STORE or ~/.local/share)")
    r.add_argument("--no-store", action="store_true", help="do not store the run")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_run)
    from . import report, study_cli
    study_cli.add_command(sub)
    report.add_command(sub)
    from .app import server
    server.add_command(sub)
    from . import calibrate_cli
    calibrate_cli.add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input prints one clear line and exits 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
