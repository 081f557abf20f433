"""``python -m cp_infer plan``: what a layout will do, before renting the GPUs."""

from __future__ import annotations

import argparse
from pathlib import Path

from cp_infer.costmodel import PROFILES, PlanRecord, cluster_profile, plan_prefill
from cp_infer.entrypoints.launch import HelpFormatter, add_common_arguments
from cp_infer.models.config import PRESETS, get_preset
from cp_infer.reporting import check_writable, format_table, write_json

__all__ = ["add_parser", "run", "write_plot"]

_DESCRIPTION = """\
TTFT, TTIT and scaling of one prompt over CP sizes, from first principles: the model's FLOPs and
bytes, a hardware profile and achieved utilizations documented in cp_infer/costmodel.py (it
reproduces the paper's 3.8 s for a 128K prefill and 77 s for 1M of Llama 3 405B on 16 hosts).
Each row also gives Alg. 1's predicted crossover: below that miss rate (new / (new + cached)
tokens), a prefill of this context goes pass-Q.

  python -m cp_infer plan --preset llama3-405b --hardware h100-rdma --context 131072 \\
      --cp 1,2,4,8,16 --json plan.json --plot plan.png

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
        "over RDMA or TCP), or a JSON profile written by `python -m cp_infer calibrate` "
        "(default: h100-rdma)",
    )  # fmt: skip
    g.add_argument("--context", type=int, required=True, help="prompt tokens")
    g.add_argument("--cp", default="1,2,4,8,16", help="CP sizes (hosts), comma-separated")
    g.add_argument(
        "--tp", type=int,
        help="devices per CP rank (TP inside a host); default: 8 for the H100 profiles, 1 for a "
        "calibrated profile (one CPU rank per CP rank)",
    )  # fmt: skip
    g.add_argument(
        "--dtype-bytes", type=int, choices=(1, 2, 4),
        help="bytes per weight / KV element; default: 2 (BF16) for the H100 profiles, 4 (fp32, "
        "as the CPU engine runs) for a calibrated profile",
    )  # fmt: skip
    g.add_argument("--json", type=Path, metavar="PATH", help="also write the records")
    g.add_argument(
        "--plot", type=Path, metavar="PATH",
        help="also draw TTFT and efficiency against CP (.png, .svg or .pdf; needs matplotlib: "
        "pip install 'cp_infer[plot]')",
    )  # fmt: skip
    add_common_arguments(g)
    g.set_defaults(run=run)
    return g


def run(args, argv: list[str]) -> int:
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
    cfg, prof = get_preset(args.preset), cluster_profile(args.hardware)
    records = [
        plan_prefill(cfg, prof, cp=n, tp=args.tp, context=args.context,
                     bytes_per_element=args.dtype_bytes)
        for n in cps
    ]  # fmt: skip
    rows = [[str(r.cp), str(r.tp), str(r.context), f"{r.ttft_s:.3g}", f"{1000 * r.ttit_s:.3g}",
             r.variant, f"{r.efficiency:.3f}", f"{r.crossover_miss_rate:.4f}",
             f"{1000 * r.gemm_s_per_layer:.3g}", f"{1000 * r.attention_s_per_layer:.3g}",
             f"{1000 * r.comm_s_per_layer:.3g}",
             f"{r.memory_bytes_per_gpu / 2**30:.3g}"] for r in records]  # fmt: skip
    e = args.dtype_bytes or prof.bytes_per_element
    print(f"{cfg.name} on {args.hardware}, {args.context} tokens, {e} bytes per element:")
    print(format_table(["cp", "tp", "context", "ttft_s", "ttit_ms", "variant", "efficiency",
                        "pass_q_below", "gemm_ms/layer", "attn_ms/layer", "comm_ms/layer",
                        "GiB/GPU"], rows))  # fmt: skip
    for r in records:
        if r.cp > 1:
            print(f"cp={r.cp}: Alg. 1 predicts pass-Q below a miss rate of "
                  f"{100 * r.crossover_miss_rate:.2f}% at {r.context} tokens")  # fmt: skip
    if args.json:
        write_json(args.json, [r.to_dict() for r in records])
    if args.plot is not None:
        where = args.hardware if args.hardware in PROFILES else Path(args.hardware).name
        write_plot(records, args.plot, title=f"{cfg.name} on {where}, {args.context} tokens")
    return 0


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


def write_plot(records: list[PlanRecord], path: Path, *, title: str) -> None:
    """TTFT against CP (log-log, with ideal scaling from CP=1) and parallel efficiency."""
    plt = _pyplot()
    records = sorted(records, key=lambda r: r.cp)
    cps = [r.cp for r in records]
    ttft1 = records[0].efficiency * records[0].cp * records[0].ttft_s  # TTFT at CP=1
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_t.loglog(cps, [r.ttft_s for r in records], "o-", label="predicted")
    ax_t.loglog(cps, [ttft1 / n for n in cps], "k--", label="ideal (CP=1 / CP)")
    ax_t.set(xlabel="CP size", ylabel="TTFT (s)", title="prefill time")
    ax_e.semilogx(cps, [r.efficiency for r in records], "o-")
    ax_e.axhline(1.0, color="k", linestyle="--", linewidth=1)
    ax_e.set(xlabel="CP size", ylabel="TTFT(1) / (CP x TTFT(CP))", title="parallel efficiency",
             ylim=(0, 1.05))  # fmt: skip
    for r in records:
        ax_t.annotate(f"{r.ttft_s:.3g} s", (r.cp, r.ttft_s), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)  # fmt: skip
    for ax in (ax_t, ax_e):
        ax.set_xticks(cps, [str(n) for n in cps])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.grid(True, which="major", alpha=0.3)
    ax_t.margins(x=0.08, y=0.15)
    ax_t.legend()
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lower().lstrip("."))
    plt.close(fig)
