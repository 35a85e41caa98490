"""The ``bigbatch`` command: ``train``, ``compare`` and ``sweep``.

Configuration comes from the defaults, then an optional TOML/YAML file (``--config``), then
the shortcut flags, then ``--set section.key=value`` overrides (last wins). Errors in the
configuration, the data or a checkpoint print one message naming the problem and exit with
status 2; Ctrl-C saves a checkpoint and exits with 130 (continue with ``--resume``).

Data-parallel: ``--nproc N`` re-launches the command as N local processes through
``python -m torch.distributed.run --standalone --nproc-per-node N -m bigbatch.train.cli``
(the same arguments); the command may also be started by ``torchrun`` directly, on one
machine or several (see ``dist_env.py``). Rank 0 alone prints, writes and reports.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from bigbatch.train.checkpoint import CheckpointError, resumable_step
from bigbatch.train.config import Config, ConfigError, load_config
from bigbatch.train.data import DATASET_NAMES, Dataset, DatasetError, TextDataset, load_dataset
from bigbatch.train.dist_env import (
    RESTART_ENV,
    TIMEOUT_ENV,
    DistContext,
    PeerRankError,
    check_distributed,
    context,
    from_main,
    init_from_env,
    launch_id,
    restarted_by_launcher,
    shutdown,
)
from bigbatch.train.interrupt import TrainingInterrupted
from bigbatch.train.malloc_tuning import tune_malloc
from bigbatch.train.metrics import MetricsError
from bigbatch.train.models import MODEL_NAMES
from bigbatch.train.optimizers import OPTIMIZERS
from bigbatch.train.process_lifetime import run_launcher, watch_parent
from bigbatch.train.rank_watch import (
    DEFAULT_STALL_LIMIT_S,
    STALL_LIMIT_ENV,
    announce_worker,
    stall_limit,
)

__all__ = ["main"]

EPILOG = (
    "Configuration: defaults < --config file < flags < --set overrides. "
    f"Datasets: {', '.join(DATASET_NAMES)}. Models: {', '.join(MODEL_NAMES)}. "
    f"Optimizers: {', '.join(OPTIMIZERS)}."
)


def _say(message: str) -> None:
    if context().is_main:
        print(message, flush=True)


def _error(message: str) -> None:
    ctx = context()
    where = f" (rank {ctx.rank})" if ctx.enabled else ""
    print(f"bigbatch: error{where}: {message}", file=sys.stderr, flush=True)


def _common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--config", type=Path, help="TOML or YAML file with config sections")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--data-dir", help="folder with the dataset (sets data.data_dir)")
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the dataset from its official source if no copy is found (checked)",
    )
    parser.add_argument("--dataset", help=f"dataset name ({', '.join(DATASET_NAMES)})")
    parser.add_argument("--model", help=f"model name ({', '.join(MODEL_NAMES)})")
    parser.add_argument("--epochs", type=float, help="training epochs per run")
    parser.add_argument("--batch-size", type=int, help="effective (global) batch size")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        help="samples per forward/backward (0: whole batch, -1: automatic)",
    )
    parser.add_argument("--seed", type=int, help="seed of the weights and the data order")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints in --out"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds an earlier run (its files are replaced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel over N local processes (re-launched through torchrun)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="with --nproc: torchrun restarts every process up to K times after one fails; "
        "each restart resumes from the last checkpoint (see train.checkpoint_every)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        metavar="SECONDS",
        help=f"how long a collective waits for the other processes (sets {TIMEOUT_ENV}; "
        "default 300)",
    )
    parser.add_argument(
        "--stall-limit",
        type=float,
        metavar="SECONDS",
        help="with --nproc: a process stopped (SIGSTOP, a debugger) this long is named and "
        f"ended, and the job with it (sets {STALL_LIMIT_ENV}; default "
        f"{DEFAULT_STALL_LIMIT_S:g}; inf: never)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigbatch",
        description="Train, compare optimizers and sweep batch sizes for large-batch training.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="one run from a config file plus overrides", epilog=EPILOG)
    _common(train, "runs/train")
    train.add_argument("--optimizer", help="optimizer name (sets optimizer.name)")
    train.add_argument("--lr", type=float, help="peak learning rate (sets optimizer.lr)")
    compare = sub.add_parser(
        "compare",
        help="several optimizers, each over a small lr grid: a table and a plot",
        epilog=EPILOG,
    )
    _common(compare, "runs/compare")
    compare.add_argument(
        "--optimizers", help="comma-separated optimizer names (sets compare.optimizers)"
    )
    sweep = sub.add_parser(
        "sweep", help="optimizers x batch sizes: steps to target against batch", epilog=EPILOG
    )
    _common(sweep, "runs/sweep")
    sweep.add_argument("--optimizers", help="comma-separated optimizer names")
    sweep.add_argument("--batch-sizes", help="comma-separated batch sizes (sets sweep.batch_sizes)")
    parser.set_defaults(_subparsers={"train": train, "compare": compare, "sweep": sweep})
    return parser


def _parse(arguments: list[str]) -> argparse.Namespace:
    """Parse; an unknown option is reported by its subcommand's parser (its usage, and a
    "did you mean" among its options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(arguments)
    if extra:
        sub: argparse.ArgumentParser = args._subparsers[args.command]
        options = [o for action in sub._actions for o in action.option_strings]
        unknown = next((e for e in extra if e.startswith("-")), extra[0])
        close = difflib.get_close_matches(unknown.split("=")[0], options, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "data.data_dir": args.data_dir,
        "data.name": args.dataset,
        "model.name": args.model,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.micro_batch_size": args.micro_batch_size,
        "train.seed": args.seed,
        "optimizer.name": getattr(args, "optimizer", None),
        "optimizer.lr": getattr(args, "lr", None),
    }
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.download:
        out.append("data.download=true")
    if args.no_progress:
        out.append("train.progress=never")
    if getattr(args, "optimizers", None):
        out.append(f"compare.optimizers=[{args.optimizers}]")
    if getattr(args, "batch_sizes", None):
        out.append(f"sweep.batch_sizes=[{args.batch_sizes}]")
    return out + list(args.overrides)


def _load(cfg: Config) -> Dataset:
    d = cfg.data
    try:
        return load_dataset(d.name, d.data_dir, download=d.download, cache_dir=d.cache_dir)
    except ValueError as exc:  # an unknown name or a bad option
        raise ConfigError(f"data.name={d.name!r}: {exc}") from None


def _check_world(command: str, cfg: Config, world_size: int) -> None:
    if command == "train":
        batches, optimizers = [cfg.train.batch_size], [cfg.optimizer.name]
        options, key = {cfg.optimizer.name: cfg.optimizer.options}, "optimizer.options"
    else:
        batches = [cfg.train.batch_size] if command == "compare" else list(cfg.sweep.batch_sizes)
        optimizers = list(cfg.compare.optimizers)
        options, key = dict(cfg.compare.options), "compare.options.{name}"
    check_distributed(
        world_size,
        batch_sizes=batches,
        micro_batch_size=cfg.train.micro_batch_size,
        optimizers=optimizers,
        options=options,
        options_key=key,
    )


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` (torchrun's parser would take it for its own)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name.startswith("--np") and "--nproc".startswith(name):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def launch_command(nproc: int, argv: Sequence[str], max_restarts: int = 0) -> list[str]:
    """The torchrun command that runs ``bigbatch <argv>`` as ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "bigbatch.train.cli",
        *_without_nproc(argv),
    ]


def _launch(nproc: int, argv: Sequence[str], max_restarts: int) -> int:
    """Run the same command under torchrun; wait for it (Ctrl-C reaches the workers too)."""
    env = dict(os.environ)
    # torchrun would give every process 1 thread; share the machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return run_launcher(launch_command(nproc, argv, max_restarts), env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bigbatch`` console script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parse(arguments)
    tune_malloc()
    command = "bigbatch " + " ".join(shlex.quote(a) for a in arguments)
    if args.dist_timeout is not None:
        os.environ[TIMEOUT_ENV] = str(args.dist_timeout)
    if args.stall_limit is not None:
        os.environ[STALL_LIMIT_ENV] = str(args.stall_limit)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: stop when the agent is gone
        watch_parent()
        announce_worker()
    code = 1
    try:
        code = _main(args, arguments, command)
        return code
    finally:  # after a success or Ctrl-C every rank is here; after an error one may be gone
        shutdown(together=code in (0, 130))


def _main(args: argparse.Namespace, arguments: list[str], command: str) -> int:
    try:
        cfg = load_config(args.config, _overrides(args))
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a file; --out names a folder for the run")
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        if args.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be at least 0, got {args.max_restarts}")
        if args.max_restarts and args.nproc < 2 and "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "--max-restarts needs --nproc 2 or more (torchrun restarts the processes it "
                "started); for one process, re-run the command with --resume"
            )
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet under a launcher
            _check_world(args.command, cfg, args.nproc)
            stall_limit()  # a bad --stall-limit is an error before anything starts
            return _launch(args.nproc, arguments, args.max_restarts)
        ctx = init_from_env(cfg.train.device)
        _check_world(args.command, cfg, ctx.world_size)
        loaded: list[Dataset] = []
        # rank 0 loads (and downloads) first; its error reaches every rank
        from_main(ctx, lambda: loaded.append(_load(cfg)))
        dataset = loaded[0] if loaded else _load(cfg)
        if isinstance(dataset, TextDataset):
            sizes = f"{dataset.tokens.numel():,} characters, vocabulary {dataset.num_classes}"
        else:
            sizes = f"{len(dataset.train_y)} train / {len(dataset.test_y)} test images"
        _say(f"data: {dataset.name} from {dataset.source} ({sizes})")
        launch, resume = (
            (None, True) if args.resume else _after_restart(ctx, args.command, args.out)
        )
        if args.command == "train" and not resume and not args.overwrite:
            _refuse_earlier_run(args.out)
        return _run(args.command, cfg, dataset, args.out, resume, command, launch)
    except (ConfigError, DatasetError, CheckpointError, MetricsError) as exc:
        if context().is_main:  # the same on every rank: said once, by rank 0
            print(f"bigbatch: error: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(2.0)  # let rank 0 say it before torchrun stops the job
        return 2
    except PeerRankError as exc:
        _error(str(exc))
        return 1
    except TrainingInterrupted as exc:
        if context().is_main:
            print(
                f"\nbigbatch: {exc}; continue with the same command and --resume",
                file=sys.stderr,
            )
        return 130


def _refuse_earlier_run(out: Path) -> None:
    """``train`` into a folder holding an earlier run would replace its checkpoint and
    metrics without a word: ask for ``--resume`` or ``--overwrite``."""
    earlier = [n for n in ("checkpoint.pt", "metrics.jsonl") if (out / n).is_file()]
    if earlier and (out / earlier[0]).stat().st_size > 0:
        raise ConfigError(
            f"--out {out} holds an earlier run ({', '.join(earlier)}): add --resume to continue "
            "it, or --overwrite to start over there"
        )


def _after_restart(ctx: DistContext, command: str, out: Path) -> tuple[str | None, bool]:
    """(torchrun's job id, resume) when torchrun restarted this job after a failure, else
    (None, False).

    Then ``train`` resumes from its checkpoint if this job wrote it (not an earlier job in
    the same folder), and ``compare``/``sweep`` reuse only the runs this job finished.
    Rank 0 looks at the files; every rank gets its answer.
    """
    job = launch_id()
    if not restarted_by_launcher() or job is None:
        return None, False
    resume = True
    where = f"the runs finished in {out}"
    if command == "train":
        path = out / "checkpoint.pt"
        step = from_main(ctx, partial(resumable_step, path, job))
        resume = step is not None
        where = f"step {step} of {path}" if resume else "the start (no checkpoint yet)"
    _say(f"restart {os.environ.get(RESTART_ENV)} by torchrun: resuming from {where}")
    return job, resume


def _run(
    command: str,
    cfg: Config,
    dataset: Dataset,
    out: Path,
    resume: bool,
    line: str,
    launch: str | None = None,
) -> int:
    """Run ``command``; with ``launch`` (torchrun's job id after a restart) ``resume``
    reuses only what that job itself wrote."""
    from bigbatch.train.experiments import run_compare, run_sweep
    from bigbatch.train.loop import TrainingRun
    from bigbatch.train.report import write_compare, write_sweep

    main = context().is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if command == "train":
        result = TrainingRun(cfg, dataset, out).run(resume=resume)
        _say(
            f"{result.status}: {result.steps} steps, final test accuracy "
            f"{result.last('test_acc'):.4f}, best {result.best('test_acc'):.4f}; "
            f"metrics in {out / 'metrics.jsonl'}, checkpoint in {out / 'checkpoint.pt'}"
        )
        return 0 if result.status == "finished" else 1
    if command == "compare":
        choices = run_compare(cfg, dataset, out, resume=resume, say=_say, launch=launch)
        if not main:
            return 0
        md, png, table = write_compare(choices, cfg, out, command=line, dataset=dataset)
    else:
        choices = run_sweep(cfg, dataset, out, resume=resume, say=_say, launch=launch)
        if not main:
            return 0
        md, png, table = write_sweep(choices, cfg, out, command=line, dataset=dataset)
    _say("\n" + table)
    _say(f"table: {md}\nplot:  {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
