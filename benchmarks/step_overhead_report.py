"""B1's targets and report (``step_overhead.py``): the verdicts against the targets and the
tables printed per model.
"""

from __future__ import annotations

import statistics
from typing import Any

from bigbatch.train.machine import available_cpus
from common import MIB
from step_overhead_contenders import CHEAP_NLCG, FUSED_NLCG, Contender
from step_overhead_measure import paired_ratio, ratio_of

FULL_TARGET = 1.05  # NLCG full step / SGD full step
STEP_TARGET = 1.5  # NLCG step() / Adam(foreach) step()
FUSED_STEP_TARGET = 1.2  # NLCG(fused=True) step() / Adam(foreach) step()
STALE_TARGET = 1.25  # SP-NGD (stale statistics) mean full step / SGD mean full step
PEER_TARGET = 0.8  # SP-NGD (every step) mean full step / ASDL K-FAC (every step) mean
# ratios to SGD measured earlier on this machine type (ResNet-20, batch 128, mean of 30 steps)
REFERENCE_RATIOS = {
    "asdl-kfac-every": 6.4,
    "asdl-kfac-10": 1.54,
    "kfac-pytorch (every step)": 7.3,
}


def add_verdicts(name: str, row: dict[str, Any]) -> None:
    """The NLCG targets' verdicts on a contender's row (cheap NLCG contenders only)."""
    if name not in CHEAP_NLCG:
        return
    row["full_pass"] = row["full_ratio_to_sgd"] <= FULL_TARGET
    step_ratio = row["step_ratio_to_adam"]
    target = FUSED_STEP_TARGET if name in FUSED_NLCG else STEP_TARGET
    row["step_target"] = target
    row["step_pass"] = None if step_ratio is None else step_ratio <= target


def kfac_targets(by_name: dict[str, Contender]) -> dict[str, Any]:
    """SP-NGD's two targets, where their contenders ran."""
    out: dict[str, Any] = {}
    sgd = by_name["sgd"]
    if "spngd-stale" in by_name:
        ratio = ratio_of(by_name["spngd-stale"], sgd, "full_s", statistics.fmean)
        out["spngd_stale_mean_vs_sgd"] = ratio
        out["spngd_stale_pass"] = ratio is not None and ratio <= STALE_TARGET
    if "spngd-every" in by_name and "asdl-kfac-every" in by_name:
        ratio = ratio_of(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s", statistics.fmean
        )
        out["spngd_every_mean_vs_asdl_every"] = ratio
        out["spngd_every_vs_asdl_every_median"] = ratio_of(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s", statistics.median
        )
        out["spngd_every_vs_asdl_every_paired"] = paired_ratio(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s"
        )
        out["spngd_every_pass"] = ratio is not None and ratio <= PEER_TARGET
    return out


def fmt(value: float | None, spec: str, width: int) -> str:
    """``value`` formatted to ``width``, or ``-`` for None."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table(result: dict[str, Any]) -> None:
    """One model's medians, means and refreshes per contender, and the verdicts."""
    rows = result["contenders"]
    header = (
        f"{'contender':<15} {'full ms':>9} {'x SGD':>7} {'(paired)':>8} {'step() ms':>10} "
        f"{'x Adam':>7} {'(paired)':>8} {'state MiB':>10}  verdict"
    )
    print("medians:")
    print(header)
    print("-" * (len(header) + 22))
    for name, row in rows.items():
        verdict = ""
        if "full_pass" in row:
            full_v = "PASS" if row["full_pass"] else "FAIL"
            step_v = {True: "PASS", False: "FAIL", None: "n/a"}[row["step_pass"]]
            verdict = f"full {full_v}, step() {step_v}"
        step_ms = None if "step_timing" in row else row["optimizer_step_ms"]["median"]
        print(
            f"{name:<15} {row['full_step_ms']['median']:>9.2f} "
            f"{fmt(row['full_ratio_to_sgd'], '.3f', 7)} "
            f"{fmt(row['full_ratio_to_sgd_paired'], '.3f', 8)} "
            f"{fmt(step_ms, '.3f', 10)} {fmt(row['step_ratio_to_adam'], '.2f', 7)} "
            f"{fmt(row['step_ratio_to_adam_paired'], '.2f', 8)} {row['state_mib']:>10.2f}  "
            f"{verdict}"
        )
    print(
        f"targets: NLCG (none/bfgs/adam) full step <= {FULL_TARGET:.2f}x SGD full step; "
        f"NLCG step() <= {STEP_TARGET:.2f}x Adam(foreach) step(), fused=True <= "
        f"{FUSED_STEP_TARGET:.2f}x (verdicts use the ratios of "
        "medians over the same rounds; '(paired)' is the median of per-round ratios); ASDL's "
        "step() is only its SGD update (its curvature work is in the forward/backward), so '-'"
    )
    header2 = (
        f"{'contender':<15} {'rounds':>9} {'mean ms':>9} {'median ms':>10} {'max ms':>9} "
        f"{'x SGD mean':>10} {'x SGD med':>9} {'fwd/bwd ms':>10} {'refreshed':>9}  figure"
    )
    print("\nmean (amortized), median and slowest full step over each contender's window:")
    print(header2)
    print("-" * (len(header2) + 4))
    for name, row in rows.items():
        full = row["full_step_ms"]
        refresh = row.get("refresh")
        fraction = None if refresh is None else refresh["fraction_window"]
        print(
            f"{name:<15} {row['warmup']:>3}+{row['timed_rounds']:<5} {full['mean']:>9.2f} "
            f"{full['median']:>10.2f} {full['max']:>9.2f} "
            f"{fmt(row['full_ratio_to_sgd_mean'], '.3f', 10)} "
            f"{fmt(row['full_ratio_to_sgd'], '.3f', 9)} {row['fwd_bwd_ms_mean']:>10.2f} "
            f"{fmt(fraction, '.3f', 9)}  {row['figure']}"
        )
    print(
        "rounds: warm-up+timed; ratios to SGD use SGD's steps in the same rounds; fwd/bwd: "
        "mean full minus step() (includes the curvature hooks; for ASDL all its K-FAC work); "
        "refreshed: fraction of (statistic, step) pairs refreshed in the window"
    )
    for name, row in rows.items():
        refresh = row.get("refresh")
        if refresh is None:
            continue
        extra = ""
        if "intervals_at_end" in refresh:
            iv = refresh["intervals_at_end"]
            extra = (
                f"; whole run {refresh['fraction_total']:.3f}; intervals at the end "
                f"min/median/max {iv['min']}/{iv['median']:g}/{iv['max']}"
            )
        with_r, without = refresh["full_ms_mean_refresh_steps"], refresh["full_ms_mean_other_steps"]
        print(
            f"  {name}: {refresh['statistics']} statistics, refreshed fraction in window "
            f"{refresh['fraction_window']:.3f} ({refresh['steps_with_refresh']}/"
            f"{row['timed_rounds']} steps refresh something{extra}); mean full step "
            f"{fmt(with_r, '.1f', 0)} ms with a refresh, {fmt(without, '.1f', 0)} ms without"
        )
    targets = result["kfac_targets"]
    if "spngd_stale_mean_vs_sgd" in targets:
        ratio = targets["spngd_stale_mean_vs_sgd"]
        print(
            f"target SP-NGD stale, amortized (mean) <= {STALE_TARGET:.2f}x SGD: "
            f"{fmt(ratio, '.3f', 0)}x -> {'PASS' if targets['spngd_stale_pass'] else 'FAIL'}"
        )
    if "spngd_every_mean_vs_asdl_every" in targets:
        ratio = targets["spngd_every_mean_vs_asdl_every"]
        print(
            f"target SP-NGD every step <= {PEER_TARGET:.2f}x ASDL K-FAC every step (mean): "
            f"{fmt(ratio, '.3f', 0)}x (medians "
            f"{fmt(targets['spngd_every_vs_asdl_every_median'], '.3f', 0)}x, paired "
            f"{fmt(targets['spngd_every_vs_asdl_every_paired'], '.3f', 0)}x) -> "
            f"{'PASS' if targets['spngd_every_pass'] else 'FAIL'}"
        )
    if result["model"] == "resnet20" and any(n.startswith("asdl-") for n in rows):
        ref = ", ".join(f"{k} {v}x" for k, v in REFERENCE_RATIOS.items())
        print(f"reference ratios to SGD measured earlier (ResNet-20, mean of 30 steps): {ref}")
    load = result["load_average_1min"]
    cpus = available_cpus()
    if cpus and any(v is not None and v > cpus + 0.5 for v in load.values()):
        print(
            f"warning: load average {load['before']:.2f} -> {load['after']:.2f} on {cpus} CPUs: "
            "other processes competed for the CPU; the timings are unreliable"
        )
    print(
        f"parameters: {result['param_bytes'] / MIB:.2f} MiB; {result['total_rounds']} rounds "
        f"took {result['timed_wall_s']:.1f} s; "
        f"process peak RSS so far {result['peak_rss_mib_after']:.0f} MiB",
        flush=True,
    )
