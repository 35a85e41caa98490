"""B1 on a GPU: step time and peak memory of SGD, AdamW, SP-NGD, NLCG and ASDL's K-FAC.

Each contender trains its own copy of the model (same initial weights, same batches) on
the device: ``--warmup`` untimed steps (stale statistics reach their intervals), then
``--rounds`` timed steps, one contender after the other (a GPU's step time is steady; the
CPU benchmark interleaves because a shared host is not). Every timed step is bracketed by
``torch.cuda.synchronize()`` (wall-clock of the whole step, host syncs and launches
included); the peak is ``torch.cuda.max_memory_allocated`` over the timed steps. Reported:
median and mean step ms, ratios to SGD's and AdamW's mean (the amortized cost), peak MiB,
and the issue's targets. On a CPU (``--dry-run``) the same code runs at tiny sizes, to keep
the script from rotting between GPU runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import step_overhead_contenders as contenders  # noqa: E402  (the CPU benchmark's contenders)
from bigbatch.train.models import build_model  # noqa: E402
from common import write_results  # noqa: E402

CONTENDERS = ("sgd", "adamw", "spngd-stale", "spngd-every", "nlcg-bfgs", "nlcg-kfac", "asdl")
TARGETS = {
    "spngd_stale_mean_vs_sgd_resnet20_b1024_max": 1.15,
    "nlcg_bfgs_mean_vs_sgd_max": 1.05,
    "spngd_every_mean_vs_asdl_every_max": 0.5,
}


def _build(name: str, model: nn.Module, batch: int) -> contenders.Contender:
    plan = contenders.Plan(warmup=0, rounds=0)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        return contenders.Contender(name, model, opt, plan)
    return contenders.make_contender(
        "asdl-kfac-every" if name == "asdl" else name, model, plan, batch
    )


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _step(c: contenders.Contender, x: Tensor, y: Tensor, sync: Any) -> float:
    sync()
    t0 = time.perf_counter()
    if c.grad_maker is not None:
        gm = c.grad_maker
        c.optimizer.zero_grad()
        dummy = gm.setup_model_call(c.model, x)
        gm.setup_loss_call(F.cross_entropy, dummy, y)
        gm.forward_and_backward()
        c.optimizer.step()
    else:
        c.optimizer.zero_grad()
        loss = _loss(c.model(x), y)
        loss.backward()
        c.optimizer_step(loss.detach())
    sync()
    return time.perf_counter() - t0


def measure(
    workload: str, batch: int, names: list[str], device: torch.device, warmup: int, rounds: int
) -> dict[str, Any]:
    """Every contender on one (model, batch) workload; a JSON-ready row per contender."""
    gen = torch.Generator().manual_seed(0)
    if workload == "resnet20":
        make = lambda: build_model("resnet20", in_channels=3, image_size=32, num_classes=10)  # noqa: E731
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
    else:  # the character-level transformer LM of the LM benchmark (width 64, 2 layers)
        make = lambda: build_model("gpt", num_classes=80, width=64, context=64)  # noqa: E731
        x = torch.randint(0, 80, (batch, 64), generator=gen)
        y = torch.randint(0, 80, (batch, 64), generator=gen)
    x, y = x.to(device), y.to(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows: dict[str, Any] = {}
    for name in names:
        if name == "asdl" and (contenders.asdl is None or workload != "resnet20"):
            rows[name] = {"skipped": "ASDL not installed" if contenders.asdl is None
                          else "ASDL's K-FAC is measured on ResNet-20 only"}  # fmt: skip
            continue
        torch.manual_seed(0)
        model = make().to(device)
        model.train()
        try:
            c = _build(name, model, batch)
            for _ in range(warmup):
                _step(c, x, y, sync)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = [_step(c, x, y, sync) for _ in range(rounds)]
        except Exception as exc:  # recorded, so one contender cannot sink the run
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        rows[name] = {
            "median_ms": 1e3 * statistics.median(times),
            "mean_ms": 1e3 * statistics.fmean(times),
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        }
        del c, model
        if cuda:
            torch.cuda.empty_cache()
    for base in ("sgd", "adamw"):
        ref = rows.get(base, {}).get("mean_ms")
        for row in rows.values():
            if ref and "mean_ms" in row:
                row[f"mean_vs_{base}"] = row["mean_ms"] / ref
    return {"workload": workload, "batch_size": batch, "warmup": warmup, "rounds": rounds,
            "contenders": rows}  # fmt: skip


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, where their contenders ran."""
    out: dict[str, Any] = {}
    for r in results:
        rows = r["contenders"]
        tag = f"{r['workload']}_b{r['batch_size']}"
        stale = rows.get("spngd-stale", {}).get("mean_vs_sgd")
        if r["workload"] == "resnet20" and stale is not None:
            out[f"spngd_stale_mean_vs_sgd_{tag}"] = stale
        nlcg = rows.get("nlcg-bfgs", {}).get("mean_vs_sgd")
        if nlcg is not None:
            out[f"nlcg_bfgs_mean_vs_sgd_{tag}"] = nlcg
        every = rows.get("spngd-every", {}).get("mean_ms")
        peer = rows.get("asdl", {}).get("mean_ms")
        if every is not None and peer:
            out[f"spngd_every_mean_vs_asdl_every_{tag}"] = every / peer
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a few steps")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        plan = [("resnet20", 256), ("resnet20", 1024), ("gpt", 256)]
        warmup, rounds = 30, 50
    else:
        plan = [("resnet20", 8), ("gpt", 4)]
        warmup, rounds = 2, 3
    started = time.perf_counter()
    results = [measure(w, b, args.contenders, device, warmup, rounds) for w, b in plan]
    report = {
        "benchmark": "B1 on the GPU (issue 16)",
        "command": "python benchmarks/gpu/step_cost.py " + " ".join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run: not a figure)",
        "torch": torch.__version__,
        "results": results,
        "targets": TARGETS,
        "measured": targets(results),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_results(args.out, report, indent=1)
    print(json.dumps(report["measured"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
