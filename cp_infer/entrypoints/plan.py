"""``python -m cp_infer plan``: what a layout will do, before renting the GPUs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cp_infer.costmodel import PUBLISHED, PlanRecord, plan_prefill, plan_tiers
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.hardware import PROFILES, profile
from cp_infer.models.config import PRESETS, get_preset
from cp_infer.planner import KV_DTYPES
from cp_infer.reporting import check_writable, format_table, write_json

__all__ = ["add_parser", "run", "write_plot"]

_DESCRIPTION = """\
TTFT, TTIT, memory and scaling of one prompt over CP sizes, from the hardware model
(cp_infer/hardware.py: the FLOPs and bytes of every phase, the mechanisms that cost them, and
the figures of a profile). On the paper's hosts it reproduces its published figures for Llama
3 405B within 15%: TTFT at 128K from 1 to 16 hosts, the 1M point, the TP16 and TP32 baselines,
TTIT against CP, and Table 4's pass-KV / pass-Q crossover. Each row also gives the predicted
crossover: below that miss rate (new / (new + cached) tokens), pass-Q is the faster prefill.
A layout whose memory does not fit its devices is marked, with what would fit.

  python -m cp_infer plan --preset llama3-405b --hardware h100-rdma --quant fp8 \\
      --context 131072 --cp 1,2,4,8,16 --json plan.json --plot plan.png
  python -m cp_infer plan --preset llama3-405b --quant fp8 --context 131072 --cp 1 --tp 16

  # this machine, from a profile of `python -m cp_infer calibrate` (tp 1, fp32)
  python -m cp_infer calibrate --output profile.json
  python -m cp_infer plan --preset small-llama --hardware profile.json --context 16384 --cp 1,2
"""

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "plan", help="predict TTFT / TTIT of a layout (cost model)",
        description=_DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    g.add_argument("--preset", choices=sorted(PRESETS), required=True, help="the model shape")
    g.add_argument(
        "--hardware", default="h100-rdma", metavar="NAME|PATH",
        help=f"the hosts: a built-in profile ({', '.join(sorted(PROFILES))}: the paper's H100s "
        "over RDMA or TCP, this CPU machine), or a JSON profile written by `python -m cp_infer "
        "calibrate` (default: h100-rdma)",
    )  # fmt: skip
    g.add_argument("--context", type=int, required=True, help="prompt tokens")
    g.add_argument("--cp", default="1,2,4,8,16", help="CP sizes (hosts), comma-separated")
    g.add_argument(
        "--tp", type=int,
        help="devices per CP rank; beyond a host's devices TP crosses hosts (the paper's TP16 "
        "and TP32 baselines); default: a host (8 for the H100 profiles, 1 for a CPU rank)",
    )  # fmt: skip
    g.add_argument(
        "--quant", choices=["none", "fp8"], default="none",
        help="fp8: FP8 FFN weights (the paper's 405B runs): half their bytes, twice the GEMM rate",
    )  # fmt: skip
    g.add_argument(
        "--kv-dtype", choices=sorted(KV_DTYPES),
        help="the KV cache's dtype (default: the model's, --dtype-bytes)",
    )  # fmt: skip
    g.add_argument(
        "--dtype-bytes", type=int, choices=(1, 2, 4),
        help="bytes per weight / KV element; default: 2 (BF16) for the H100 profiles, 4 (fp32, "
        "as the CPU engine runs) for a calibrated profile",
    )  # fmt: skip
    g.add_argument("--json", type=Path, metavar="PATH", help="also write the records")
    g.add_argument(
        "--measured", type=Path, metavar="PATH",
        help="a tools/bench_model.py --json file: its rows of this preset and context go on the "
        "--plot as measured (this machine, against a calibrated --hardware)",
    )  # fmt: skip
    g.add_argument(
        "--plot", type=Path, metavar="PATH",
        help="also draw TTFT and efficiency against CP (.png, .svg or .pdf; needs matplotlib: "
        "pip install 'cp_infer[plot]')",
    )  # fmt: skip
    t = g.add_argument_group(
        "disaggregated tiers (--tiers)",
        "Size a prefill tier and a decode tier for a workload: prompts of --context tokens "
        "arriving at --rate per second, each generating --output-len tokens, within a time to "
        "first token (queueing and the KV hand-off included) and a time between tokens. "
        "E.g. plan --preset llama3-405b --quant fp8 --kv-dtype fp8_e4m3 --context 131072 "
        "--tiers --output-len 512 --rate 0.1 --ttft-slo 10 --tbt-slo 0.08",
    )  # fmt: skip
    t.add_argument("--tiers", action="store_true", help="size the two tiers (not --cp rows)")
    t.add_argument("--output-len", type=int, default=512, help="tokens generated per request")
    t.add_argument("--rate", type=float, default=0.1, help="requests arriving per second")
    t.add_argument("--ttft-slo", type=float, default=10.0, metavar="S", help="TTFT target")
    t.add_argument("--tbt-slo", type=float, default=0.08, metavar="S",
                   help="time-between-tokens target")  # fmt: skip
    t.add_argument("--max-hosts", type=int, default=64, help="hosts a tier may use at most")
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


def run_tiers(args) -> int:
    """``plan --tiers``: hosts per tier for the workload."""
    cfg, prof = get_preset(args.preset), profile(args.hardware)
    t = plan_tiers(
        cfg, prof, prompt=args.context, output=args.output_len, rate=args.rate,
        ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo, quant=args.quant,
        kv_dtype=args.kv_dtype, bytes_per_element=args.dtype_bytes, max_hosts=args.max_hosts,
    )  # fmt: skip
    host = prof.devices_per_host
    rows = [
        ["prefill", str(t.prefill_hosts),
         f"{t.prefill_replicas} x cp={t.prefill_cp} (tp={host} a host)",
         f"TTFT {t.ttft_s:.2f} s = prefill {t.prefill_s:.2f} + queue {t.queue_s:.2f} + "
         f"hand-off {t.handoff_s:.2f}", f"{t.prefill_utilization:.0%} busy",
         "yes" if t.ttft_ok else "no"],
        ["decode", str(t.decode_hosts),
         f"{t.decode_replicas} x tp={host * t.decode_hosts_per_replica}",
         f"TTIT {1000 * t.ttit_s:.1f} ms at batch {t.batch}",
         f"{t.concurrency:.1f} decoding", "yes" if t.tbt_ok else "no"],
    ]  # fmt: skip
    print(f"{cfg.name} on {prof.name}: {args.rate:g} requests/s of {args.context} + "
          f"{args.output_len} tokens, TTFT <= {args.ttft_slo:g} s, TBT <= "
          f"{1000 * args.tbt_slo:g} ms, quant {args.quant}:")  # fmt: skip
    print(format_table(["tier", "hosts", "layout", "per request", "load", "meets"], rows))
    if t.note:
        print(t.note)
    if args.json:
        write_json(args.json, [t.to_dict()])
    return 0


def run(args, argv: list[str]) -> int:
    if args.tiers:
        return run_tiers(args)
    try:
        cps = [int(x) for x in args.cp.split(",")]
    except ValueError:
        raise ValueError(f"--cp takes sizes like 1,2,4,8,16, got {args.cp!r}") from None
    if any(n < 1 for n in cps) or args.context < 1 or (args.tp is not None and args.tp < 1):
        raise ValueError("--cp sizes, --tp and --context must be >= 1")
    if args.plot is not None:
        if args.plot.suffix.lower() not in _PLOT_SUFFIXES:
            raise ValueError(f"--plot {args.plot}: name a .png, .svg or .pdf file")
        check_writable(args.plot, "--plot")
        _pyplot()  # a missing matplotlib fails before any work
    cfg, prof = get_preset(args.preset), profile(args.hardware)
    records = [
        plan_prefill(cfg, prof, cp=n, tp=args.tp, context=args.context,
                     bytes_per_element=args.dtype_bytes, quant=args.quant, kv_dtype=args.kv_dtype)
        for n in cps
    ]  # fmt: skip
    rows = [[str(r.cp), str(r.tp), str(r.context), f"{r.ttft_s:.3g}", f"{1000 * r.ttit_s:.3g}",
             f"{r.efficiency:.3f}", f"{r.crossover_miss_rate:.4f}",
             f"{1000 * r.gemm_s_per_layer:.3g}", f"{1000 * r.attention_s_per_layer:.3g}",
             f"{1000 * r.tp_comm_s_per_layer:.3g}", f"{1000 * r.comm_s_per_layer:.3g}",
             f"{r.memory_bytes_per_gpu / 2**30:.3g}", "yes" if r.fits else "NO"]
            for r in records]  # fmt: skip
    e = args.dtype_bytes or prof.bytes_per_element
    print(f"{cfg.name} on {prof.name}, {args.context} tokens, {e} bytes per element, "
          f"quant {args.quant}:")  # fmt: skip
    print(format_table(["cp", "tp", "context", "ttft_s", "ttit_ms", "efficiency",
                        "pass_q_below", "gemm_ms/layer", "attn_ms/layer", "tp_ms/layer",
                        "ring_ms/layer", "GiB/GPU", "fits"], rows))  # fmt: skip
    for r in records:
        if r.cp > 1:
            print(f"cp={r.cp}: pass-Q is the faster prefill below a miss rate of "
                  f"{100 * r.crossover_miss_rate:.2f}% at {r.context} tokens")  # fmt: skip
            print(f"cp={r.cp}: " + (
                f"the ring prefills a prompt faster than one of its ranks from "
                f"{r.ring_min_tokens} tokens (--ring-min-tokens auto)" if r.ring_min_tokens
                else "the ring prefills no prompt faster than one of its ranks"))  # fmt: skip
        if not r.fits:
            print(f"cp={r.cp} tp={r.tp}: {r.advice}")
    if args.json:
        write_json(args.json, [r.to_dict() for r in records])
    if args.plot is not None:
        where = prof.name if args.hardware in PROFILES else Path(args.hardware).name
        published = []
        if cfg.name == "llama3-405b" and args.hardware == "h100-rdma":
            published = [p for p in PUBLISHED if p.context == args.context and p.what != "crossover"
                         and (args.tp is None or p.tp == args.tp)]  # fmt: skip
        write_plot(records, args.plot, title=f"{cfg.name} on {where}, {args.context} tokens",
                   published=published, measured=_measured(args, cfg.name))  # fmt: skip
    return 0


def _measured(args, preset: str) -> dict[int, tuple[float, float]] | None:
    """{cp: (TTFT, TTIT)} of ``--measured``'s rows for this preset and context (the fastest
    decode exchange of each CP size)."""
    if args.measured is None:
        return None
    try:
        rows = json.loads(args.measured.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--measured {args.measured}: not a bench_model.py --json file ({e})"
        ) from None
    out: dict[int, tuple[float, float]] = {}
    for r in rows if isinstance(rows, list) else []:
        if r.get("preset") == preset and r.get("seq_len") == args.context:
            best = out.get(r["cp"])
            if best is None or r["ttit_s"] < best[1]:
                out[r["cp"]] = (r["ttft_s"], r["ttit_s"])
    if not out:
        raise ValueError(f"--measured {args.measured} has no {preset} row at --context "
                         f"{args.context}")  # fmt: skip
    return dict(sorted(out.items()))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install 'cp_infer[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def write_plot(
    records: list[PlanRecord], path: Path, *, title: str, published=(),
    measured: dict[int, tuple[float, float]] | None = None,
) -> None:  # fmt: skip
    """TTFT against CP (log-log, with ideal scaling from CP=1) and TTIT against CP, predicted
    against ``published`` figures (:data:`~cp_infer.costmodel.PUBLISHED` at the same TP) and
    ``measured`` ones ({cp: (TTFT s, TTIT s)}, a benchmark on this machine)."""
    plt = _pyplot()
    records = sorted(records, key=lambda r: r.cp)
    cps = [r.cp for r in records]
    ttft1 = records[0].efficiency * records[0].cp * records[0].ttft_s  # TTFT at CP=1
    fig, (ax_t, ax_d) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_t.loglog(cps, [r.ttft_s for r in records], "o-", label="predicted")
    ax_t.loglog(cps, [ttft1 / n for n in cps], "k--", label="ideal (CP=1 / CP)")
    ax_t.set(xlabel="CP size", ylabel="TTFT (s)", title="prefill time")
    ax_d.semilogx(cps, [1000 * r.ttit_s for r in records], "o-", label="predicted")
    ax_d.set(xlabel="CP size", ylabel="TTIT (ms)", title="decode step")
    tp = records[0].tp
    for what, ax, k in (("ttft", ax_t, 1.0), ("ttit", ax_d, 1000.0)):
        points = [(p.cp, k * p.value) for p in published if p.what == what and p.tp == tp]
        if points:
            ax.plot(*zip(*points, strict=True), "s", color="tab:red", label="published")
    if measured:
        ax_t.plot(list(measured), [v[0] for v in measured.values()], "s", color="tab:green",
                  label="measured")  # fmt: skip
        ax_d.plot(list(measured), [1000 * v[1] for v in measured.values()], "s",
                  color="tab:green", label="measured")  # fmt: skip
    for r in records:
        ax_t.annotate(f"{r.ttft_s:.3g} s", (r.cp, r.ttft_s), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)  # fmt: skip
    for ax in (ax_t, ax_d):
        ax.set_xticks(cps, [str(n) for n in cps])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.grid(True, which="major", alpha=0.3)
    ax_t.margins(x=0.08, y=0.15)
    ax_d.set_ylim(bottom=0)
    ax_t.legend()
    ax_d.legend()
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lower().lstrip("."))
    plt.close(fig)
