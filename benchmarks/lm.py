"""The character-level transformer LM at a large batch: SP-NGD and NLCG-K-FAC against AdamW
and LAMB, each tuned the same way, timed in the same run (issue 11, item 7).

Every contender trains the harness's ``gpt`` model (``bigbatch.train.lm``) on the harness's
text dataset through :class:`~bigbatch.train.loop.TrainingRun`, with the same data order,
steps, schedule (linear warm-up, then cosine to 0), weight decay (none) and evaluation
points. The protocol is the same for all:

- learning rates on a factor-2 log grid around each contender's centre (``--trials`` points,
  seed 0); when the best final *validation* loss is at an edge of what was tried, the
  search extends one point past that edge, up to ``--max-trials`` trials in all (the same
  budget for everyone; the table says when the bound was hit);
- the chosen lr is run with every further seed;
- reported: AdamW's final validation loss (mean over seeds) as the target; per contender
  the final validation and test loss (mean, min, max), the steps to reach the target (per
  seed; the first evaluation at or below it);
- the amortized step cost, timed separately after the training runs in one process: every
  contender at its chosen lr is stepped ``--time-warmup`` untimed steps (so stale
  statistics reach their intervals), then ``--time-rounds`` rounds of ``--time-steps``
  steps each, the contenders taking turns within a round (the same machine state for all);
  cost = timed seconds / timed steps, and its ratio to AdamW's.

Finished runs are kept under ``--out`` and reused, so an interrupted run continues.
Run from the project's root: ``python benchmarks/lm.py --data ../shared/data/kjv/kjv.txt.gz``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from bigbatch.train.batches import prepare_text
from bigbatch.train.config import config_from_mapping
from bigbatch.train.data import TextDataset, load_dataset
from bigbatch.train.loop import TrainingRun
from bigbatch.train.malloc_tuning import tune_malloc
from bigbatch.train.results import RunResult
from bigbatch.train.tuning import search_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, utc_now, write_results


@dataclass(frozen=True)
class Contender:
    label: str
    optimizer: str
    options: dict[str, Any]
    centre: float


#: centres: a 60-step probe of each at three lrs (same data and model, seed 0; see the
#: README's LM section); every option other than the lr is the library's or torch's default,
#: except weight decay (none for all) and SP-NGD's weight rescaling (off: it is meant for
#: BatchNorm networks)
CONTENDERS = {
    c.label: c
    for c in (
        Contender("adamw", "adamw", {}, 2e-3),
        Contender("lamb", "lamb", {}, 0.04),
        Contender("spngd", "spngd", {"weight_rescale": False, "damping": 1e-3}, 0.015),
        Contender(
            "spngd-fresh",
            "spngd",
            {"weight_rescale": False, "damping": 1e-3, "staleness": False},
            0.015,
        ),
        Contender(
            "spngd-reduce",
            "spngd",
            {"weight_rescale": False, "damping": 1e-3, "kfac_approx": "reduce"},
            0.005,
        ),
        Contender("nlcg-kfac", "nlcg", {"preconditioner": "kfac", "kfac_damping": 1e-3}, 0.015),
    )
}


def _config(args: argparse.Namespace, c: Contender, lr: float, seed: int, spe: int) -> Any:
    return config_from_mapping(
        {
            "data": {"name": "text", "data_dir": str(args.data), "context": args.context},
            "model": {
                "name": "gpt",
                "width": args.width,
                "depth": args.depth,
                "heads": args.heads,
                "attention": args.attention,
            },
            "optimizer": {
                "name": c.optimizer,
                "lr": lr,
                "weight_decay": 0.0,
                "options": dict(c.options),
            },
            "schedule": {"kind": "cosine", "warmup_epochs": args.warmup / spe},
            "train": {
                "seed": seed,
                "epochs": args.steps / spe,
                "batch_size": args.batch_size,
                "eval_every": args.eval_every,
                "threads": args.threads,
                "progress": "never",
                "divergence_factor": 3.0,
            },
        }
    )


def _run(
    args: argparse.Namespace,
    dataset: TextDataset,
    splits: Any,
    c: Contender,
    lr: float,
    seed: int,
    spe: int,
) -> dict[str, Any]:
    run_dir = args.out / f"{c.label}_lr{lr:.6g}_seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    cfg = _config(args, c, lr, seed, spe)
    started = time.perf_counter()
    result: RunResult = TrainingRun(cfg, dataset, run_dir, splits=splits).run()
    record = {
        "contender": c.label,
        "lr": lr,
        "seed": seed,
        "status": result.status,
        "steps": result.steps,
        "train_s": result.wall_s,
        "total_s": time.perf_counter() - started,
        "history": [
            {k: r.get(k) for k in ("step", "val_loss", "test_loss", "val_acc", "wall_s")}
            for r in result.history
        ],
    }
    record["final_val_loss"] = _final(record, "val_loss")
    record["final_test_loss"] = _final(record, "test_loss")
    done.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"{c.label:13s} lr={lr:<8.3g} seed={seed} {result.status:9s} steps={result.steps:4d} "
        f"val={record['final_val_loss']:.4f} train {result.wall_s:6.1f}s",
        flush=True,
    )
    return record


def _final(record: dict[str, Any], key: str) -> float:
    if record["status"] != "finished":
        return math.inf
    values = [h[key] for h in record["history"] if h.get(key) is not None]
    return float(values[-1]) if values else math.inf


def _search(
    args: argparse.Namespace, run: Any, c: Contender
) -> tuple[float, list[dict[str, Any]], str | None]:
    """Seed-0 lr search by the shared tuning protocol: a factor-2 grid around the centre,
    extended past an edge up to ``max_trials``; scored by final validation loss."""
    half = (args.trials - 1) / 2
    grid = [c.centre * 2.0 ** (k - half) for k in range(args.trials)]

    def trial(lr: float) -> tuple[float, dict[str, Any]]:
        record = run(c, lr, 0)
        return float(record["final_val_loss"]), record

    search = search_lr(grid, trial, higher_is_better=False, max_trials=args.max_trials)
    trials = [record for _, _, record in search.trials]
    best = search.best_lr if search.best_lr is not None else grid[0]
    return best, trials, search.bound_hit


def _steps_to(record: dict[str, Any], target: float) -> int | None:
    for h in record["history"]:
        if h.get("val_loss") is not None and h["val_loss"] <= target and h["step"] > 0:
            return int(h["step"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a UTF-8 text file (or .gz)")
    parser.add_argument(
        "--optimizers", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS)
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--attention", choices=("mha", "linear"), default="mha")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-warmup", type=int, default=40)
    parser.add_argument("--time-rounds", type=int, default=6, help="0: use the runs' own times")
    parser.add_argument("--time-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/lm"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="lm_kjv")
    args = parser.parse_args(argv)
    tune_malloc()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("text", args.data)
    assert isinstance(dataset, TextDataset)
    splits = prepare_text(dataset, args.context, torch.device("cpu"))
    spe = dataset.part("train").numel() // (args.batch_size * args.context)
    started = time.time()

    def run(c: Contender, lr: float, seed: int) -> dict[str, Any]:
        return _run(args, dataset, splits, c, lr, seed, spe)

    chosen: dict[str, dict[str, Any]] = {}
    for label in args.optimizers:
        c = CONTENDERS[label]
        lr, trials, bound_hit = _search(args, run, c)
        seeds = [trials[[t["lr"] for t in trials].index(lr)]]
        seeds += [run(c, lr, s) for s in args.seeds if s != 0]
        chosen[label] = {"lr": lr, "trials": trials, "bound_hit": bound_hit, "runs": seeds}
    summary = _summarise(chosen)
    if args.time_rounds:
        timing = _time_steps(args, dataset, splits, {k: v["lr"] for k, v in chosen.items()}, spe)
        for label, cost in timing.items():
            summary["rows"][label]["step_s"] = cost
            base = timing.get("adamw")
            summary["rows"][label]["cost_ratio_to_adamw"] = None if base is None else cost / base
    info = {
        "command": "python benchmarks/lm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": utc_now(),
        "wall_s": round(time.time() - started, 1),
        "machine": machine(args.threads),
        "data": {"source": dataset.source, "md5": dataset.md5, "notes": dataset.notes},
        "setup": {
            k: getattr(args, k)
            for k in (
                "steps",
                "warmup",
                "batch_size",
                "context",
                "width",
                "depth",
                "heads",
                "attention",
                "eval_every",
                "trials",
                "max_trials",
                "seeds",
                "time_warmup",
                "time_rounds",
                "time_steps",
            )
        },
        "tokens_per_step": args.batch_size * args.context,
        "steps_per_epoch": spe,
    }
    out = {"info": info, "summary": summary, "contenders": chosen}
    args.results.mkdir(parents=True, exist_ok=True)
    write_results(args.results / f"{args.name}.json", out, indent=1)
    table = _table(info, summary)
    (args.results / f"{args.name}.md").write_text(table)
    _plot(chosen, summary, args.results / f"{args.name}.png")
    print(table)
    return 0


def _time_steps(
    args: argparse.Namespace, dataset: TextDataset, splits: Any, lrs: dict[str, float], spe: int
) -> dict[str, float]:
    """Seconds per training step of each contender at its lr, interleaved (see the module
    docstring); the harness's own step (data, forward, backward, optimizer) is timed."""
    runs = {}
    for label, lr in lrs.items():
        cfg = _config(args, CONTENDERS[label], lr, 0, spe)
        runs[label] = TrainingRun(cfg, dataset, args.out / "timing" / label, splits=splits)
    for run in runs.values():
        for _ in range(args.time_warmup):
            run._train_step()
            run.step += 1
    spent = dict.fromkeys(runs, 0.0)
    for _ in range(args.time_rounds):
        for label, run in runs.items():
            started = time.perf_counter()
            for _ in range(args.time_steps):
                run._train_step()
                run.step += 1
            spent[label] += time.perf_counter() - started
    steps = args.time_rounds * args.time_steps
    return {label: total / steps for label, total in spent.items()}


def _summarise(chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    adamw = chosen.get("adamw")
    target = (
        statistics.mean(r["final_val_loss"] for r in adamw["runs"]) if adamw is not None else None
    )
    base_cost = (
        statistics.mean(r["train_s"] / max(r["steps"], 1) for r in adamw["runs"])
        if adamw is not None
        else None
    )
    rows = {}
    for label, entry in chosen.items():
        runs = entry["runs"]
        vals = [r["final_val_loss"] for r in runs]
        tests = [r["final_test_loss"] for r in runs]
        costs = [r["train_s"] / max(r["steps"], 1) for r in runs]
        steps = [_steps_to(r, target) if target is not None else None for r in runs]
        adam_steps = runs[0]["steps"]
        rows[label] = {
            "lr": entry["lr"],
            "trials": len(entry["trials"]),
            "bound_hit": entry["bound_hit"],
            "edge": entry["lr"]
            in (min(t["lr"] for t in entry["trials"]), max(t["lr"] for t in entry["trials"])),
            "val_loss": [statistics.mean(vals), min(vals), max(vals)],
            "test_loss": [statistics.mean(tests), min(tests), max(tests)],
            "steps_to_target": steps,
            "steps_ratio_to_adamw": (
                None
                if any(s is None for s in steps)
                else statistics.mean(s for s in steps if s is not None) / adam_steps
            ),
            "step_s": statistics.mean(costs),
            "cost_ratio_to_adamw": None
            if base_cost is None
            else statistics.mean(costs) / base_cost,
        }
    return {"target_val_loss": target, "rows": rows}


def _table(info: dict[str, Any], summary: dict[str, Any]) -> str:
    s = info["setup"]
    lines = [
        "# Character-level transformer LM at a large batch (issue 11, item 7)",
        "",
        f"- command: `{info['command']}`",
        f"- date: {info['date']}; machine: {info['machine']['cpu_model']}, "
        f"{info['machine']['torch_threads']} threads, torch {info['machine']['torch']}; "
        f"wall {info['wall_s'] / 60:.1f} min",
        f"- data: {info['data']['source']} ({info['data']['notes']})",
        f"- model: gpt width {s['width']}, depth {s['depth']}, heads {s['heads']}, attention "
        f"{s['attention']}, context {s['context']}; batch {s['batch_size']} windows = "
        f"{info['tokens_per_step']} tokens/step; {s['steps']} steps "
        f"({s['steps'] / info['steps_per_epoch']:.2f} epochs), warm-up {s['warmup']}, cosine",
        f"- tuning: lr on a factor-2 grid of {s['trials']} points, extended past an edge up to "
        f"{s['max_trials']} trials, chosen by final validation loss (seed 0); seeds "
        f"{s['seeds']} at the chosen lr",
        f"- target: AdamW's final validation loss, {summary['target_val_loss']:.4f} "
        "(mean of its seeds)",
        "",
        "| optimizer | lr (trials) | final val loss mean [min, max] | final test loss mean | "
        "steps to target (per seed) | steps / AdamW's | amortized step cost / AdamW's |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in summary["rows"].items():
        note = " (bound hit)" if r["bound_hit"] else (" (edge)" if r["edge"] else "")
        steps = ", ".join("not reached" if x is None else str(x) for x in r["steps_to_target"])
        ratio = "-" if r["steps_ratio_to_adamw"] is None else f"{r['steps_ratio_to_adamw']:.2f}"
        cost = "-" if r["cost_ratio_to_adamw"] is None else f"{r['cost_ratio_to_adamw']:.2f}"
        v, t = r["val_loss"], r["test_loss"]
        lines.append(
            f"| {label} | {r['lr']:.3g} ({r['trials']}){note} | {v[0]:.4f} [{v[1]:.4f}, "
            f"{v[2]:.4f}] | {t[0]:.4f} | {steps} | {ratio} | {cost} ({r['step_s'] * 1000:.0f} ms) |"
        )
    return "\n".join(lines) + "\n"


def _plot(chosen: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for label, entry in chosen.items():
        run = entry["runs"][0]
        pts = [(h["step"], h["val_loss"]) for h in run["history"] if h.get("val_loss") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{label} (lr {entry['lr']:.3g})")
        trials = sorted(entry["trials"], key=lambda t: t["lr"])
        bx.plot(
            [t["lr"] for t in trials],
            [min(t["final_val_loss"], 5.0) for t in trials],
            marker="o",
            label=label,
        )
    if summary["target_val_loss"] is not None:
        ax.axhline(summary["target_val_loss"], color="gray", ls="--", lw=0.8, label="target")
    ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="seed 0 at the chosen lr")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
    bx.set(
        xscale="log", xlabel="learning rate", ylabel="final validation loss", title="lr sensitivity"
    )
    for a in (ax, bx):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
