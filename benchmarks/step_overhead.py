"""Benchmark B1: per-step overhead of NLCG and SP-NGD against momentum SGD and Adam (CPU).

For each model (ResNet-20 on random 3x32x32 inputs, a 784-1024-1024-10 MLP on random 784
inputs; batch 128, 10 classes, cross-entropy) every contender gets its own copy of the model,
built from the same seed:

- ``sgd``: ``torch.optim.SGD(momentum=0.9, foreach=True)``, the baseline;
- ``adam``: ``torch.optim.Adam(foreach=True)``;
- ``nlcg-none``, ``nlcg-bfgs``, ``nlcg-adam``: ``bigbatch.NLCG(lr=0.01, preconditioner=P)``
  stepped as ``opt.step(loss=loss)``;
- K-FAC contenders (by default on ResNet-20 only, ``--kfac-models``), damping 1e-3, empirical
  Fisher, lr 0.01, momentum 0.9:

  - ``spngd-stale``: ``bigbatch.SPNGD(model)`` with stale statistics (default
    ``staleness=True``: per-statistic refresh intervals adapted up to 32 steps);
  - ``spngd-every``: ``bigbatch.SPNGD(model, staleness=False)``: every statistic refreshed
    and every block re-inverted on every step;
  - ``nlcg-kfac``: ``bigbatch.NLCG(preconditioner=bigbatch.KFACPreconditioner(model))``
    (stale statistics), stepped as ``opt.step(loss=loss)``;
  - ``asdl-kfac-every`` / ``asdl-kfac-10``: the peer K-FAC of ASDL (PyPI ``asdfghjkl``
    0.1a5, module ``asdl``): ``KfacGradientMaker(model, PreconditioningConfig(data_size=B,
    damping=1e-3, preconditioner_upd_interval=k, curvature_upd_interval=k),
    fisher_type="fisher_emp")`` with ``k = 1`` or ``10``, and momentum SGD
    (``foreach=True``) on the preconditioned gradient. Skipped with a note when ``asdl``
    cannot be imported (install: ``pip install --no-deps -r benchmarks/requirements-peers.txt``).

The contenders run INTERLEAVED: each round does one training step of every active
contender, in a freshly shuffled order, so drift of the machine (clock, other load) hits all
of them alike. A training step is ``zero_grad``, forward, backward, ``optimizer.step``; it is
timed with ``time.perf_counter`` as a whole ("full") and ``optimizer.step`` alone ("step").
For ASDL the forward and backward are ``grad_maker.forward_and_backward()``, which also
computes the curvature, inverts and preconditions, so its "step" is only the SGD update.
Python's garbage collector is off inside a round and run between rounds.

Contenders have their own warm-up and timed windows, all ENDING at the last round (so the
windows overlap and SGD, timed over the longest one, is measured alongside every contender):

- sgd, adam, nlcg-none/bfgs/adam: ``--warmup`` untimed + ``--rounds`` timed rounds;
- spngd-every, asdl-kfac-every: ``--warmup`` + ``--kfac-rounds``;
- spngd-stale: ``--stale-warmup`` (default 64, so the refresh intervals have grown to their
  steady state) + ``--amortized-rounds`` (default 128: four maximal 32-step intervals);
  nlcg-kfac: ``--stale-warmup`` + half of ``--amortized-rounds`` (to bound the run time);
  asdl-kfac-10: ``--warmup`` + ``--amortized-rounds`` rounded up to a multiple of 10 (so the
  window holds a whole number of its refresh periods).

Contenders that do extra work only on some steps (spngd-stale, nlcg-kfac, asdl-kfac-10) are
judged by the MEAN full step over their window (amortized cost); the others by the median.
Every contender's mean, median and slowest step are reported, with ratios to SGD computed
over the same rounds (SGD's steps in the contender's window). For the K-FAC contenders the
fraction of (statistic, step) pairs refreshed in the window is reported as well (for SP-NGD
from its refresh schedule, i.e. ``opt.refresh_fraction`` restricted to the window).

Targets: NLCG (none/bfgs/adam) full step <= 1.05x SGD's and ``step()`` alone <= 1.5x
Adam(foreach)'s (medians); SP-NGD with stale statistics, amortized (mean) <= 1.25x SGD;
SP-NGD refreshing every step <= 0.8x ASDL K-FAC refreshing every step (mean full step).

Optimizer memory: for torch optimizers the bytes of the unique tensor storages in
``opt.state``; for NLCG ``opt.buffer_nbytes()`` (flat state plus reusable workspace, plus
the K-FAC preconditioner's statistics and inverses); for SP-NGD the momentum buffers plus the
engine's statistics and inverses; for ASDL the SGD state plus the tensors of the Fisher
objects it attaches to the modules. Peak RSS (``getrusage``) is per process, so it is
cumulative over the models run before.

Run from the repository root::

    .venv/bin/python benchmarks/step_overhead.py                        # defaults
    .venv/bin/python benchmarks/step_overhead.py --contenders sgd spngd-stale
    .venv/bin/python benchmarks/step_overhead.py --rounds 3 --warmup 1 --kfac-rounds 2 \\
        --amortized-rounds 10 --stale-warmup 2                          # quick smoke run

Results go to ``benchmarks/results/step_overhead.json`` (``--out`` to change).

This file is the command line and the run of one model; the contenders are built in
``step_overhead_contenders.py``, timed and measured in ``step_overhead_measure.py``, judged
and printed in ``step_overhead_report.py``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from models import MODEL_SPECS, ModelSpec
from step_overhead_contenders import (
    AMORTIZED,
    ASDL_IMPORT_ERROR,
    ASDL_INTERVAL,
    CONTENDERS,
    KFAC_CONTENDERS,
    KFAC_DAMPING,
    KFAC_LR,
    KFAC_MOMENTUM,
    NLCG_LR,
    asdl,
    asdl_version,
    build_contenders,
    plan_contenders,
    select_contenders,
)
from step_overhead_measure import contender_row, run_rounds
from step_overhead_report import (
    FULL_TARGET,
    FUSED_STEP_TARGET,
    PEER_TARGET,
    REFERENCE_RATIOS,
    STALE_TARGET,
    STEP_TARGET,
    add_verdicts,
    fmt,
    kfac_targets,
    print_table,
)

DEFAULT_ROUNDS = {"resnet20": 30, "mlp": 100}
DEFAULT_KFAC_ROUNDS = 30
DEFAULT_AMORTIZED_ROUNDS = 128
DEFAULT_STALE_WARMUP = 64
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct random batches, cycled through (generated before timing)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_overhead.json"


def benchmark_model(
    spec: ModelSpec,
    names: Sequence[str],
    fast_rounds: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every contender on one model, interleaved; the model's JSON result (table printed)."""
    batch_size, seed = args.batch_size, args.seed
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [spec.random_batch(batch_size, NUM_CLASSES, gen) for _ in range(args.batches)]
    plans = plan_contenders(names, fast_rounds, args)
    contenders = build_contenders(spec, names, plans, batch_size, seed)
    total = max(c.plan.warmup + c.plan.rounds for c in contenders)
    n_params = sum(p.numel() for p in contenders[0].model.parameters())
    windows = "; ".join(
        f"{c.name} {c.plan.warmup}+{c.plan.rounds}" for c in contenders if c.name != "sgd"
    )
    print(
        f"\n== {spec.name}: {n_params:,} parameters, batch {batch_size}, {len(contenders)} "
        f"contenders, {total} rounds; warm-up+timed rounds: sgd {plans['sgd'].warmup}+"
        f"{plans['sgd'].rounds}; {windows}",
        flush=True,
    )
    if any(n in KFAC_CONTENDERS for n in names):
        print(
            "   K-FAC windows: spngd-stale and nlcg-kfac warm up untimed for "
            f"{args.stale_warmup} steps (refresh intervals reach their steady state) before "
            "their timed window; asdl-kfac-10's window is a whole number of its 10-step "
            "periods; every window ends at the last round, next to SGD's",
            flush=True,
        )
    rng = random.Random(seed)
    load_before = common.load_average()
    started = time.perf_counter()

    def progress(r: int, total: int) -> None:
        if (r + 1) % max(1, total // 8) == 0 or r + 1 == total:
            elapsed = time.perf_counter() - started
            print(f"   round {r + 1}/{total} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    run_rounds(contenders, batches, rng, on_round=progress)
    wall_s = time.perf_counter() - started
    load_after = common.load_average()

    by_name = {c.name: c for c in contenders}
    sgd, adam = by_name["sgd"], by_name.get("adam")
    rows: dict[str, Any] = {}
    for c in contenders:
        row = contender_row(c, sgd, adam)
        if row.get("skipped_steps"):
            print(
                f"   warning: {c.name} skipped {row['skipped_steps']} non-finite steps",
                file=sys.stderr,
            )
        add_verdicts(c.name, row)
        rows[c.name] = row
    result = {
        "model": spec.name,
        "parameters": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in contenders[0].model.parameters()),
        "input_shape": list(spec.input_shape),
        "batch_size": batch_size,
        "rounds": fast_rounds,
        "warmup": args.warmup,
        "total_rounds": total,
        "timed_wall_s": wall_s,  # all rounds, warm-up included (windows overlap)
        "load_average_1min": {"before": load_before, "after": load_after},
        "peak_rss_mib_after": common.peak_rss_mib(),
        "contenders": rows,
        "kfac_targets": kfac_targets(by_name),
    }
    print_table(result)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODEL_SPECS),
        default=["resnet20", "mlp"],
        help="models to benchmark, in this order",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help="contenders to run (sgd, the baseline, is always added; ASDL ones are skipped "
        "with a note when asdl is not installed)",
    )
    parser.add_argument(
        "--kfac-models",
        nargs="*",
        choices=sorted(MODEL_SPECS),
        default=["resnet20"],
        help="models on which the K-FAC contenders (spngd-*, nlcg-kfac, asdl-*) run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds of sgd/adam/nlcg-* per model (default per model: {DEFAULT_ROUNDS})",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per contender")
    parser.add_argument(
        "--kfac-rounds",
        type=int,
        default=DEFAULT_KFAC_ROUNDS,
        help="timed rounds of spngd-every and asdl-kfac-every",
    )
    parser.add_argument(
        "--amortized-rounds",
        type=int,
        default=DEFAULT_AMORTIZED_ROUNDS,
        help="timed rounds of spngd-stale and asdl-kfac-10 (rounded up to a multiple of "
        f"{ASDL_INTERVAL}); nlcg-kfac gets half of them",
    )
    parser.add_argument(
        "--stale-warmup",
        type=int,
        default=DEFAULT_STALE_WARMUP,
        help="untimed rounds of spngd-stale and nlcg-kfac (refresh intervals reach steady state)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batches",
        type=int,
        default=NUM_BATCHES,
        help="distinct random batches, generated before timing and cycled through",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if min(args.kfac_rounds, args.amortized_rounds) < 1:
        parser.error("--kfac-rounds and --amortized-rounds must be >= 1")
    if min(args.warmup, args.stale_warmup) < 0 or min(args.threads, args.batch_size) < 1:
        parser.error("--warmup and --stale-warmup must be >= 0, --threads and --batch-size >= 1")
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # ASDL's hooks trigger torch's deprecation warning on every forward
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    started = time.perf_counter()
    machine = common.machine(torch.get_num_threads(), versions={"asdfghjkl": asdl_version()})
    print(
        f"B1 step overhead | {machine['cpu_model']} | {machine['cpus_available']} CPUs | "
        f"torch {machine['torch']} | {machine['torch_threads']} threads | load average "
        f"{fmt(common.load_average(), '.2f', 0)}"
    )
    requested_asdl = [n for n in args.contenders if n.startswith("asdl-")]
    if requested_asdl and asdl is None:
        print(
            f"note: {', '.join(requested_asdl)} skipped: asdl not importable "
            f"({ASDL_IMPORT_ERROR}); pip install --no-deps -r benchmarks/requirements-peers.txt"
        )
    skipped_models = [m for m in args.models if m not in args.kfac_models]
    if skipped_models and any(n in KFAC_CONTENDERS for n in args.contenders):
        print(
            f"note: K-FAC contenders run on {', '.join(args.kfac_models) or 'no model'} only "
            f"(not on {', '.join(skipped_models)}; see --kfac-models)"
        )
    results = []
    for name in args.models:
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[name]
        names = select_contenders(args.contenders, name, args.kfac_models)
        results.append(benchmark_model(MODEL_SPECS[name], names, rounds, args))
    wall = time.perf_counter() - started
    report = {
        "benchmark": "B1 step overhead",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date_utc": common.utc_iso(),
        "machine": machine,
        "settings": {
            "rounds": args.rounds,
            "default_rounds": DEFAULT_ROUNDS,
            "warmup": args.warmup,
            "kfac_rounds": args.kfac_rounds,
            "amortized_rounds": args.amortized_rounds,
            "stale_warmup": args.stale_warmup,
            "kfac_models": args.kfac_models,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "num_batches": args.batches,
            "contenders": {
                "sgd": "torch.optim.SGD(lr=0.01, momentum=0.9, foreach=True)",
                "adam": "torch.optim.Adam(lr=1e-3, foreach=True)",
                "nlcg-<P>": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=P); step(loss=loss)",
                "nlcg-<P>-fused": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=P, fused=True); "
                "step(loss=loss)",
                "spngd-stale": f"bigbatch.SPNGD(model, lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, "
                f"damping={KFAC_DAMPING}) (staleness=True)",
                "spngd-every": f"bigbatch.SPNGD(model, lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, "
                f"damping={KFAC_DAMPING}, staleness=False)",
                "nlcg-kfac": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=bigbatch."
                f"KFACPreconditioner(model, damping={KFAC_DAMPING})); step(loss=loss)",
                "asdl-kfac-<k>": "asdl.KfacGradientMaker(model, PreconditioningConfig("
                f"data_size=batch, damping={KFAC_DAMPING}, preconditioner_upd_interval=k, "
                "curvature_upd_interval=k), fisher_type='fisher_emp') + torch.optim.SGD("
                f"lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, foreach=True); k = 1 (every) or "
                f"{ASDL_INTERVAL}",
            },
            "amortized_contenders": list(AMORTIZED),
            "timing": "perf_counter; interleaved rounds in shuffled order; gc off in a round; "
            "per-contender windows ending at the last round; ratios over common rounds",
        },
        "targets": {
            "nlcg_full_step_vs_sgd_max": FULL_TARGET,
            "nlcg_step_vs_adam_foreach_max": STEP_TARGET,
            "nlcg_fused_step_vs_adam_foreach_max": FUSED_STEP_TARGET,
            "spngd_stale_mean_vs_sgd_max": STALE_TARGET,
            "spngd_every_mean_vs_asdl_every_max": PEER_TARGET,
        },
        "reference_ratios_to_sgd": REFERENCE_RATIOS,
        "results": {r["model"]: r for r in results},
        "wall_s": wall,
    }
    common.write_results(args.out, report, indent=2)
    print(f"\nwrote {args.out} (wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
