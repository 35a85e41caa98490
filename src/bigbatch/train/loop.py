"""One training run: data order, recipes, accumulation, evaluation, checkpoints, resume.

A run is fully determined by its :class:`~bigbatch.train.config.Config`: the model's
initial weights come from ``train.seed``; every random choice of a step (batch order,
augmentation, mixup, dropout, Monte Carlo labels) is drawn from generators seeded by
(seed, step), so a run resumed from a checkpoint repeats exactly what the uninterrupted run
would have done (on the CPU; CUDA kernels may differ in the last bits).

A step: the global batch is split into ``batch_size / micro_batch_size`` micro-batches;
each contributes ``loss * len(micro) / batch_size`` to the gradient (so the sum equals the
full batch's mean-loss gradient, and SP-NGD's curvature statistics combine the same way);
then the optimizer steps (NLCG gets the batch loss for its step control), the learning-rate
schedule advances and the weight average (if any) is updated. A non-finite or exploding
loss stops the run as "diverged" before anything reaches the weights.

Under ``torchrun`` the run is data-parallel: each rank takes its contiguous share of every
global batch, gradients are summed across ranks once (or by an optimizer that averages its
own: see its registry entry's capabilities), buffers averaged, one small all-reduce shares
the loss, failures and Ctrl-C; rank 0 writes. The details: docs/distributed.md.

Not here: building models/optimizers/data (their modules), comparing runs (``experiments.py``).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from bigbatch.distributed import DistributedConfig
from bigbatch.train.augment import random_crop_flip, random_erasing
from bigbatch.train.batches import (
    BatchOrder,
    Split,
    TextWindows,
    derive_seed,
    prepare_splits,
    prepare_text,
)
from bigbatch.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bigbatch.train.config import Config, ConfigError, OptimizerConfig
from bigbatch.train.data import ImageDataset
from bigbatch.train.data.text import TextDataset
from bigbatch.train.dist_env import (
    all_reduce_sum,
    barrier,
    check_distributed,
    from_main,
    init_from_env,
    launch_id,
    local_device,
    raise_together,
)
from bigbatch.train.ema import make_ema
from bigbatch.train.evaluate import evaluate
from bigbatch.train.interrupt import GracefulInterrupt, TrainingInterrupted, once_per_ctrl_c
from bigbatch.train.metrics import MetricsLog, read_metrics
from bigbatch.train.micro_batch import auto_micro_batch
from bigbatch.train.models import build_model
from bigbatch.train.optimizers import build_optimizer, capabilities, optimizer_spec
from bigbatch.train.results import RunResult
from bigbatch.train.resume_check import check_same_run
from bigbatch.train.schedules import lr_factor_fn
from bigbatch.train.targets import Mixup, one_hot_smooth, soft_cross_entropy

__all__ = ["RunResult", "TrainingRun", "resolve_device"]

CHECKPOINT_NAME = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but no CUDA device is available here (torch "
            f"{torch.__version__}); use train.device=cpu or auto"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainingRun:
    """Trains one model with one optimizer; ``run()`` returns a :class:`RunResult`."""

    def __init__(
        self,
        cfg: Config,
        dataset: ImageDataset | TextDataset,
        run_dir: str | Path,
        *,
        name: str | None = None,
        splits: tuple[Split | TextWindows, Split | None, Split] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.name = name or self.run_dir.name
        t = cfg.train
        self.dist = init_from_env(t.device)
        check_distributed(
            self.dist.world_size,
            batch_sizes=[t.batch_size],
            micro_batch_size=t.micro_batch_size,
            optimizers=[cfg.optimizer.name],
            options={cfg.optimizer.name: cfg.optimizer.options},
        )
        self.device = local_device(resolve_device(t.device), self.dist)
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.text = isinstance(dataset, TextDataset)
        if isinstance(dataset, TextDataset):
            _check_text_config(cfg)
            self.train, self.val, self.test = splits or prepare_text(
                dataset, cfg.data.context, self.device
            )
            epoch = dataset.part("train").numel() // (t.batch_size * cfg.data.context)
            self.order = BatchOrder(len(self.train), t.batch_size, t.seed, max(1, epoch))
        else:
            self.train, self.val, self.test = splits or prepare_splits(
                dataset, cfg.data.validation_size, self.device
            )
            self.order = BatchOrder(len(self.train), t.batch_size, t.seed)
        self.num_classes = dataset.num_classes
        spe = self.order.steps_per_epoch
        self.total_steps = max(1, round(t.epochs * spe))
        self.eval_every = t.eval_every or spe
        torch.manual_seed(t.seed)
        m = cfg.model
        try:
            if isinstance(dataset, TextDataset):
                model = build_model(
                    m.name,
                    num_classes=dataset.num_classes,
                    width=m.width,
                    context=cfg.data.context,
                    depth=m.depth,
                    heads=m.heads,
                    attention=m.attention,
                    dropout=m.dropout,
                )
            else:
                channels, size, _ = dataset.input_shape
                model = build_model(
                    m.name,
                    in_channels=channels,
                    image_size=size,
                    num_classes=dataset.num_classes,
                    width=m.width,
                )
        except ValueError as exc:
            raise ConfigError(f"model.name={m.name!r}: {exc}") from None
        self.model = model.to(self.device)
        self.spec = optimizer_spec(cfg.optimizer.name)
        # the optimizer averages gradients and statistics itself (each rank: its mean loss)
        self.caps = capabilities(cfg.optimizer)
        self.curvature_dist = self.dist.enabled and self.caps.averages_own_gradients
        s = cfg.schedule
        self.warmup_steps = min(round(s.warmup_epochs * spe), self.total_steps - 1)
        self.optimizer = build_optimizer(self.model, self._optimizer_config())
        try:
            factor = lr_factor_fn(
                "constant" if self.caps.own_schedule else s.kind,
                total_steps=self.total_steps,
                warmup_steps=0 if self.caps.own_schedule else self.warmup_steps,
                power=s.power,
                milestones=s.milestones,
                gamma=s.gamma,
                final_factor=s.final_factor,
            )
        except ValueError as exc:
            raise ConfigError(f"schedule: {exc}") from None
        self.scheduler = LambdaLR(self.optimizer, factor)
        r = cfg.recipe
        self.mixup = Mixup(r.mixup_alpha, running=r.running_mixup) if r.mixup_alpha else None
        self.ema = make_ema(self.model, r.ema_decay) if r.ema_decay > 0 else None
        self.micro = self._micro_batch_size()
        if self.caps.forward_backward is not None and self.micro < t.batch_size:
            raise ConfigError(
                f"train.micro_batch_size={t.micro_batch_size}: optimizer "
                f"{cfg.optimizer.name!r} runs its own forward and backward over the whole "
                f"batch ({t.batch_size}); micro-batches are not supported with it"
            )
        if self.dist.enabled:
            self._sync_from_main()
        self._interrupt: GracefulInterrupt | None = None
        self._stop_requested = False
        self.step = 0
        self.first_loss: float | None = None
        self.min_loss = math.inf  # the lowest training loss so far (divergence reference)
        self.loss_sum = 0.0
        self.loss_count = 0
        self.elapsed = 0.0
        self.status = "finished"

    # ------------------------------------------------------------------ setup
    def _optimizer_config(self) -> OptimizerConfig:
        """``optimizer`` with SP-NGD's ``distributed`` option made a DistributedConfig, and
        the harness's warm-up given to an optimizer that schedules itself."""
        cfg = self.cfg.optimizer
        if self.caps.own_schedule and "warmup_steps" not in cfg.options:
            cfg = cfg.model_copy(
                update={"options": {**cfg.options, "warmup_steps": self.warmup_steps}}
            )
        if not self.caps.distributed_option:
            return cfg
        options = dict(cfg.options)
        mode = options.pop("distributed", "hybrid")
        if self.dist.enabled:
            try:
                options["distributed"] = DistributedConfig(mode)
            except ValueError as exc:
                raise ConfigError(f"optimizer.options.distributed: {exc}") from None
        elif "distributed" not in cfg.options:
            return cfg  # a single process: exactly as configured
        return cfg.model_copy(update={"options": options})

    def _micro_batch_size(self) -> int:
        m, batch = self.cfg.train.micro_batch_size, self.cfg.train.batch_size
        batch //= self.dist.world_size  # this rank's share of the global batch
        if m == 0:
            return batch
        if m > 0:
            return m
        probe = self.train.take(torch.arange(8, device=self.device))
        chosen = auto_micro_batch(self.model, probe[0], probe[1], batch)
        if self.dist.enabled:  # the smallest choice of all ranks (a divisor of the share)
            value = torch.tensor([chosen], dtype=torch.float64, device=self.dist.comm_device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
            chosen = int(value.item())
        return chosen

    def _sync_from_main(self) -> None:
        """Every rank starts from rank 0's weights and buffers (as DDP does)."""
        comm = self.dist.comm_device
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            data = tensor.data.to(comm)
            torch.distributed.broadcast(data, src=0)
            tensor.data.copy_(data)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    # ------------------------------------------------------------------ one step
    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The step's augmented inputs and targets (class indices or soft targets)."""
        idx = self.order.indices(step)
        if self.dist.enabled:  # this rank's contiguous share of the global batch
            start, stop = self.dist.shard(idx.shape[0])
            idx = idx[start:stop]
        idx = idx.to(self.device)
        x, y = self.train.take(idx)
        r = self.cfg.recipe
        gen = torch.Generator(device=self.device).manual_seed(self._seed(step, 1))
        if r.crop_padding or r.flip:
            x = random_crop_flip(x, padding=r.crop_padding, generator=gen, flip=r.flip)
        if r.random_erasing > 0:
            x = random_erasing(x, p=r.random_erasing, generator=gen)
        if self.mixup is None and r.label_smoothing == 0:
            return x, y
        target = one_hot_smooth(y, self.num_classes, r.label_smoothing)
        if self.mixup is not None:
            x, target = self.mixup(x, target, gen)
        return x, target

    @staticmethod
    def _loss(logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() > 2 and target.dtype == torch.long:  # a language model: every token
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        if target.dtype == torch.long:
            return F.cross_entropy(logits.float(), target)
        loss: Tensor = soft_cross_entropy(logits.float(), target)
        return loss

    def _seed(self, step: int, purpose: int) -> int:
        """The seed of one step's random draws; per rank in a data-parallel run."""
        if self.dist.enabled:
            return derive_seed(self.cfg.train.seed, step, purpose, self.dist.rank)
        return derive_seed(self.cfg.train.seed, step, purpose)

    def _accumulate(self, x: Tensor, target: Tensor, batch: int) -> Tensor:
        """Forward/backward of ``x`` in micro-batches, each weighted by ``len / batch``
        (an optimizer that runs its own forward and backward: the whole of ``x`` at once; it
        runs in one process, so ``x`` is the whole batch)."""
        if self.caps.forward_backward is not None:
            loss = self.caps.forward_backward(
                self.optimizer, x, lambda logits: self._loss(logits, target)
            )
            return loss.detach()
        total = torch.zeros((), device=self.device)
        for start in range(0, x.shape[0], self.micro):
            xs, ts = x[start : start + self.micro], target[start : start + self.micro]
            logits = self.model(xs)
            loss = self._loss(logits, ts) * (xs.shape[0] / batch)
            if self.caps.after_forward is not None:
                self.caps.after_forward(self.optimizer, logits)
            loss.backward()
            total += loss.detach()
        return total

    def _distributed_gradients(self) -> Tensor:
        """This rank's share of the step, then the sums across ranks; the global loss."""
        error: Exception | None = None
        total = torch.zeros((), device=self.device)
        world = self.dist.world_size
        # SP-NGD's distributed mode wants each rank's mean loss (it averages over the ranks)
        batch = self.cfg.train.batch_size // (world if self.curvature_dist else 1)
        try:
            x, target = self._batch(self.step)
            total = self._accumulate(x, target, batch)
        except Exception as exc:  # shared below, so no rank waits for a failed one
            error = exc
        requested = self._interrupt is not None and self._interrupt.requested
        control = torch.tensor(
            [float(total) if error is None else 0.0, float(error is not None), float(requested)],
            dtype=torch.float64,
            device=self.dist.comm_device,
        )
        torch.distributed.all_reduce(control)
        if control[1].item() > 0:
            raise_together(self.dist, error, f"at step {self.step}")
        self._stop_requested = control[2].item() > 0
        loss = control[0].item() / (world if self.curvature_dist else 1)
        if not self.curvature_dist:
            grads: list[Tensor] = []
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:  # unused on this rank: zeros, so every rank agrees
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
            all_reduce_sum(grads, self.dist)
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        all_reduce_sum(buffers, self.dist)
        for b in buffers:
            b.div_(self.dist.world_size)
        return torch.tensor(loss, dtype=torch.float32, device=self.device)

    def _train_step(self) -> float:
        torch.manual_seed(self._seed(self.step, 2))
        # optimizers that draw from NumPy's global generator (pytorch_optimizer's Kron
        # balances its factors at random steps) repeat their run too
        np.random.seed(self._seed(self.step, 3) % 2**32)  # noqa: NPY002 (the global one Kron uses)
        if self.dist.enabled:
            self.optimizer.zero_grad(set_to_none=True)
            total = self._distributed_gradients()
        else:
            x, target = self._batch(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            total = self._accumulate(x, target, x.shape[0])
        value = float(total)
        if self.first_loss is None:
            self.first_loss = value
        # diverged: NaN, or the loss grew by the factor over its running minimum (floored at
        # a tenth of the first loss, so noise on an almost-zero loss is no divergence)
        reference = max(min(self.min_loss, value), 0.1 * self.first_loss, 1e-12)
        limit = self.cfg.train.divergence_factor * reference
        if not math.isfinite(value) or value > limit:
            self.status = "diverged"
            self.optimizer.zero_grad(set_to_none=True)
            return value
        self.min_loss = min(self.min_loss, value)
        if self.caps.needs_loss:
            self.optimizer.step(loss=total)  # type: ignore[call-overload]
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.loss_sum += value
        self.loss_count += 1
        return value

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self) -> dict[str, Any]:
        model: nn.Module = self.ema.module if self.ema is not None else self.model
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.step / self.order.steps_per_epoch,
            "samples": self.step * self.cfg.train.batch_size,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": self.loss_sum / self.loss_count if self.loss_count else None,
        }
        switch = getattr(self.optimizer, "eval", None) if self.caps.mode_switch else None
        if switch is not None:
            switch()  # Schedule-Free: evaluate the averaged weights
        try:
            if self.val is not None:
                record["val_loss"], record["val_acc"] = evaluate(model, self.val, dist=self.dist)
            record["test_loss"], record["test_acc"] = evaluate(model, self.test, dist=self.dist)
        finally:
            if switch is not None:
                self.optimizer.train()  # type: ignore[attr-defined]
        record["wall_s"] = round(self.elapsed, 3)
        self.loss_sum, self.loss_count = 0.0, 0
        return record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The run's state; in a data-parallel run every rank must call it (collective)."""
        mixup: Any = self.mixup.state_dict() if self.mixup is not None else None
        if self.dist.enabled and self.mixup is not None:  # running mixup: one state per rank
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, mixup)
            mixup = gathered
        return {
            "format": 1,
            "launch_id": launch_id(),  # torchrun's job id: a restart resumes its own files
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "mixup": mixup,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "first_loss": self.first_loss,
            "min_loss": self.min_loss,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "elapsed": self.elapsed,
            "status": self.status,
        }

    def save(self) -> Path:
        """Write the checkpoint (rank 0 only; every rank calls this)."""
        state = self.state_dict()
        if self.dist.is_main:
            return save_checkpoint(state, self.checkpoint_path)
        return self.checkpoint_path

    def _read_checkpoint(self) -> dict[str, Any]:
        if not self.checkpoint_path.is_file():
            raise CheckpointError(
                f"--resume: no checkpoint at {self.checkpoint_path}; run without --resume"
            )
        return load_checkpoint(self.checkpoint_path)

    def load(self, state: dict[str, Any]) -> None:
        check_same_run(state.get("config", {}), self.cfg.to_dict(), self.checkpoint_path)
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.total_steps:
            raise CheckpointError(
                f"the checkpoint {self.checkpoint_path} is at step {step!r}, outside this "
                f"run's 0..{self.total_steps}: not a checkpoint of this run"
            )
        for key, value in state.get("model", {}).items():
            floating = isinstance(value, Tensor) and value.is_floating_point()
            if floating and not bool(torch.isfinite(value).all()):
                raise CheckpointError(
                    f"the checkpoint {self.checkpoint_path} cannot be resumed: model "
                    f"entry {key!r} is not finite"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"the checkpoint {self.checkpoint_path} cannot be resumed: {exc}"
            ) from None
        self.scheduler.load_state_dict(state["scheduler"])
        mixup = state["mixup"]
        if isinstance(mixup, list):  # written by a data-parallel run: one state per rank
            if len(mixup) != self.dist.world_size:
                raise CheckpointError(
                    f"the checkpoint {self.checkpoint_path} holds the running-mixup state of "
                    f"{len(mixup)} processes; resume it with as many (now "
                    f"{self.dist.world_size})"
                )
            mixup = mixup[self.dist.rank]
        if self.mixup is not None and mixup is not None:
            self.mixup.load_state_dict(mixup)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.first_loss = state["first_loss"]
        self.min_loss = float(state.get("min_loss", math.inf))
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
        self.elapsed = float(state["elapsed"])
        self.status = str(state["status"])

    # ------------------------------------------------------------------ the run
    def advance(self) -> float | None:
        """One training step (the batch, forward and backward, the optimizer step, the
        schedule), its seconds added to ``elapsed``; the step's loss, or None when it
        diverged or the run is at its end. No evaluation, no files: :meth:`run` calls it,
        and benchmarks that time several runs interleaved on one machine."""
        if self.step >= self.total_steps or self.status == "diverged":
            return None
        started = time.perf_counter()
        loss = self._train_step()
        if self.status == "diverged":
            return None
        self.step += 1
        self.elapsed += time.perf_counter() - started
        return loss

    def run(self, *, resume: bool = False, progress: bool | None = None) -> RunResult:
        """Train to the end (or from the checkpoint, with ``resume``); return the result.

        ``progress``: None follows ``train.progress`` ("auto" = only on a terminal).
        Raises :class:`TrainingInterrupted` after Ctrl-C, once the checkpoint is written.
        """
        main = self.dist.is_main  # rank 0 alone writes files
        log = None
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(self.run_dir, tensorboard=self.cfg.train.tensorboard)
        if resume:
            self.load(from_main(self.dist, self._read_checkpoint))
            if log is not None:
                log.truncate_after(self.step)
        elif log is not None:
            log.reset()
        if main:
            (self.run_dir / "config.json").write_text(_json(self.cfg.to_dict()))
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.name,
            unit="step",
            disable=_bar_disabled(self.cfg.train.progress, progress) if main else True,
            dynamic_ncols=True,
            leave=True,
        )
        every = self.cfg.train.checkpoint_every
        try:
            with GracefulInterrupt() as interrupt:
                self._interrupt = interrupt
                if self.dist.enabled and threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGINT, once_per_ctrl_c(signal.getsignal(signal.SIGINT)))
                if self.step == 0 and self.status == "finished":
                    record = self._evaluate()
                    if log is not None:
                        log.write(record)
                while (loss := self.advance()) is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    if self.step % self.eval_every == 0 or self.step == self.total_steps:
                        record = self._evaluate()
                        if log is not None:
                            log.write(record)
                        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{record['test_acc']:.4f}")
                    if every and self.step % every == 0:
                        self.save()
                    # under torchrun: Ctrl-C on any rank, agreed on in the step's all-reduce
                    if self._stop_requested if self.dist.enabled else interrupt.requested:
                        path = self.save()
                        barrier(self.dist)
                        raise TrainingInterrupted(str(path))
        finally:
            self._interrupt = None
            bar.close()
            if log is not None:
                log.close()
        self.save()
        metrics_path = self.run_dir / "metrics.jsonl"
        history = from_main(self.dist, lambda: read_metrics(metrics_path))
        result = RunResult(
            name=self.name,
            optimizer=self.cfg.optimizer.name,
            lr=self.cfg.optimizer.lr,
            batch_size=self.cfg.train.batch_size,
            steps=self.step,
            history=history,
            status=self.status,
            wall_s=self.elapsed,
            micro_batch_size=self.micro,
        )
        if main:
            summary = result.to_dict() | {"launch_id": launch_id()}
            (self.run_dir / "summary.json").write_text(_json(summary))
        barrier(self.dist)
        return result


_IMAGE_RECIPES = ("label_smoothing", "mixup_alpha", "crop_padding", "flip", "random_erasing")


def _check_text_config(cfg: Config) -> None:
    """Refuse what a character-level language model cannot use (named)."""
    if cfg.model.name != "gpt":
        raise ConfigError(f"model.name={cfg.model.name!r}: the text dataset trains model.name=gpt")
    for key in _IMAGE_RECIPES:
        if getattr(cfg.recipe, key):
            raise ConfigError(f"recipe.{key} applies to image datasets, not to text")
    if cfg.optimizer.options.get("fisher") == "mc":
        raise ConfigError("optimizer.options.fisher='mc' is for image classifiers here")


def _bar_disabled(mode: str, override: bool | None) -> bool | None:
    if override is not None:
        return not override
    return {"always": False, "never": True}.get(mode)  # None: tqdm decides (tty only)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
