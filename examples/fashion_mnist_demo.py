"""Fashion-MNIST at batch 8192: momentum SGD against NLCG, everything else held equal.

The project's demo (``make demo``) until a command-line tool exists. It trains one small
MLP (784-256-10, ReLU) from the same initial weights, on the same data order, with the same
linear warm-up + cosine learning-rate schedule and the same coupled L2 weight decay, using

- momentum SGD (``torch.optim.SGD``, momentum 0.9, Nesterov), and
- :class:`bigbatch.NLCG` (Fletcher-Reeves beta, diagonal BFGS preconditioner, loss-driven
  step control),

each over a small learning-rate grid of the same size, and prints the test accuracy after
every epoch and a final table. Batches are sliced from in-memory tensors with a seeded
``torch.randperm`` per epoch (the last partial batch is dropped, so every step sees exactly
``--batch-size`` samples). The defaults (six runs of 70 epochs, 490 steps each) finish in
about two and a half minutes on two CPU cores.

The best run of each optimizer is picked by final test accuracy: there is no validation
split, so read the numbers as a demo, not as a benchmark.

    python examples/fashion_mnist_demo.py --data-dir ../shared/data/fashion-mnist
    python examples/fashion_mnist_demo.py --download    # fetches into ~/.cache/bigbatch
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from bigbatch import NLCG
from bigbatch.train import DatasetError, ImageDataset, load_dataset

# The learning-rate grids: each optimizer's best value on the real data (default settings,
# seed 0) and its neighbours at factor 2. Both were tuned the same way and as much: the same
# six values 0.01-3 at 20 epochs, then five (40 epochs) and four (70 epochs) values at
# factor 2 around each one's best; the best was inside the sweep every time.
SGD_LRS = (0.1, 0.2, 0.4)
NLCG_LRS = (0.2, 0.4, 0.8)
OPTIMIZERS = ("sgd", "nlcg")
LABELS = {"sgd": "SGD (Nesterov 0.9)", "nlcg": "NLCG (FR, BFGS)"}
HIDDEN = 256
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.1  # of all steps
DEFAULT_EPOCHS = 70
EPOCHS_PER_LINE = 10  # per-epoch test accuracies, printed ten to a line
DEFAULT_THREADS = 2


@dataclass
class RunResult:
    optimizer: str
    lr: float
    test_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    note: str = ""

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")

    @property
    def best_acc(self) -> float:
        finite = [a for a in self.test_acc if math.isfinite(a)]
        return max(finite) if finite else float("nan")


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def make_optimizer(name: str, model: nn.Module, lr: float) -> Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY
        )
    if name == "nlcg":
        return NLCG(
            model.parameters(),
            lr=lr,
            beta_rule="fr",
            preconditioner="bfgs",
            weight_decay=WEIGHT_DECAY,
            step_control="step",
        )
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear ramp over ``warmup_steps``, then cosine decay to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 10_000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    model.train()
    return 100.0 * correct / len(x)


@dataclass(frozen=True)
class Images:
    """Standardized float32 images ``N x 1 x 28 x 28`` and their labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str


def train(name: str, lr: float, data: Images, args: argparse.Namespace) -> RunResult:
    result = RunResult(name, lr)
    n = len(data.train_x)
    batch = min(args.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * args.epochs
    model = make_model(args.seed)
    opt = make_optimizer(name, model, lr)
    sched = LambdaLR(opt, warmup_cosine(total, max(1, round(WARMUP_FRACTION * total))))
    order = torch.Generator().manual_seed(args.seed)  # same data order for every run
    tag = f"[{name} lr={lr:g}]"
    bar = tqdm(total=total, desc=tag, leave=False, file=sys.stdout, disable=not args.progress)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=order)
        loss_sum = torch.zeros(())
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if isinstance(opt, NLCG):
                opt.step(loss=loss)
            else:
                opt.step()
            sched.step()
            loss_sum += loss.detach()
            bar.update()
        result.train_loss.append(float(loss_sum) / steps_per_epoch)
        result.test_acc.append(accuracy(model, data.test_x, data.test_y))
        if epoch % EPOCHS_PER_LINE == 0 or epoch == args.epochs:
            first = (epoch - 1) // EPOCHS_PER_LINE * EPOCHS_PER_LINE + 1
            accs = " ".join(f"{a:5.2f}" for a in result.test_acc[first - 1 :])
            bar.write(
                f"{tag:<15} epochs {first:>3}-{epoch:<3} test acc % {accs} | train loss "
                f"{result.train_loss[-1]:.4f}  {time.perf_counter() - start:5.1f} s"
            )
    bar.close()
    result.wall_s = time.perf_counter() - start
    if isinstance(opt, NLCG):
        result.note = f"step multiplier {opt.control.base_lr:.3g}"
        if opt.skipped_steps:
            result.note += f", {opt.skipped_steps} skipped steps"
    return result


def print_table(results: Sequence[RunResult]) -> None:
    best = {
        name: max(
            (r for r in results if r.optimizer == name),
            key=lambda r: r.final_acc if math.isfinite(r.final_acc) else -1.0,
        )
        for name in OPTIMIZERS
        if any(r.optimizer == name for r in results)
    }
    head = f"{'optimizer':<20} {'lr':>7} {'final acc':>10} {'best acc':>9} {'wall s':>7}  note"
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        mark = "<- best" if best.get(r.optimizer) is r else ""
        line = (
            f"{LABELS[r.optimizer]:<20} {r.lr:>7g} {r.final_acc:>9.2f}% {r.best_acc:>8.2f}% "
            f"{r.wall_s:>7.1f}  {r.note}  {mark}"
        )
        print(line.rstrip())
    print()
    for name, r in best.items():
        print(
            f"best {LABELS[name]}: lr={r.lr:g}, final test accuracy {r.final_acc:.2f}% "
            f"(best epoch {r.best_acc:.2f}%)"
        )


def parse_lrs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from exc
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive numbers: {text}")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with the four Fashion-MNIST .gz files (default: $BIGBATCH_DATA_DIR, "
        "/usr/share/datasets/fashion-mnist, ~/.cache/bigbatch/fashion-mnist)",
    )
    p.add_argument("--download", action="store_true", help="download the files if not found")
    p.add_argument("--batch-size", type=positive_int, default=8192)
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, help="torch threads")
    p.add_argument("--sgd-lrs", type=parse_lrs, default=SGD_LRS, help="SGD lr grid, e.g. 0.1,0.2")
    p.add_argument("--nlcg-lrs", type=parse_lrs, default=NLCG_LRS, help="NLCG lr grid")
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated subset of " + ",".join(OPTIMIZERS),
    )
    args = p.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown or not args.optimizers:
        p.error(f"--optimizers: choose from {', '.join(OPTIMIZERS)}")
    args.progress = sys.stdout.isatty()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        loaded = load_dataset("fashion-mnist", args.data_dir, download=args.download)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    assert isinstance(loaded, ImageDataset)
    # Pixels in [0, 1], standardized with the training set's statistics (the same for all).
    train_x, test_x = loaded.train_x.float() / 255, loaded.test_x.float() / 255
    mean, std = train_x.mean(), train_x.std()
    data = Images((train_x - mean) / std, loaded.train_y, (test_x - mean) / std, loaded.test_y,
                  loaded.source)  # fmt: skip
    steps = len(data.train_x) // min(args.batch_size, len(data.train_x))
    print(
        f"Fashion-MNIST from {data.source}: {len(data.train_x)} train / {len(data.test_x)} test"
        f" images; batch {args.batch_size}, {steps} steps/epoch, {args.epochs} epochs, "
        f"MLP 784-{HIDDEN}-10, weight decay {WEIGHT_DECAY:g}, seed {args.seed}, "
        f"{torch.get_num_threads()} threads (loaded in {time.perf_counter() - start:.1f} s)"
    )
    grids = {"sgd": args.sgd_lrs, "nlcg": args.nlcg_lrs}
    results = [train(name, lr, data, args) for name in args.optimizers for lr in grids[name]]
    print_table(results)
    print(f"total wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
