"""The harness's host of ASDL's K-FAC (bigbatch.train.asdl_kfac): its preconditioned
gradient against a dense float64 K-FAC computed here from per-sample activations and output
gradients, on curvature steps and between them, and what the harness refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch.train.asdl_kfac import AsdlKfac
from bigbatch.train.config import ConfigError, load_config
from bigbatch.train.dist_env import check_distributed
from bigbatch.train.loop import TrainingRun
from tests.harness_data import synthetic_dataset

DAMPING = 1e-2


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _kfac(model: nn.Sequential, x: Tensor, y: Tensor, damping: float) -> list[tuple[Tensor, ...]]:
    """Per Linear layer: the inverse factors of K-FAC with the empirical Fisher (each factor
    a mean over the batch, ASDL's factored damping: sqrt(damping) split by pi, the ratio of
    the factors' mean eigenvalues) and the mean loss's weight and bias gradients."""
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    h = x
    for m in model:
        if isinstance(m, nn.Linear):
            inputs.append(h.detach())
            h = m(h)
            h.retain_grad()
            outputs.append(h)
        else:
            h = m(h)
    F.cross_entropy(h, y, reduction="sum").backward()  # per-sample output gradients
    n = x.shape[0]
    result = []
    for a, out in zip(inputs, outputs, strict=True):
        g = out.grad
        assert g is not None
        big_a, big_b = a.T @ a / n, g.T @ g / n
        pi = torch.sqrt((big_a.trace() / big_a.shape[0]) / (big_b.trace() / big_b.shape[0]))
        r = damping**0.5
        a_inv = torch.linalg.inv(big_a + r * pi * torch.eye(big_a.shape[0], dtype=a.dtype))
        b_inv = torch.linalg.inv(big_b + r / pi * torch.eye(big_b.shape[0], dtype=a.dtype))
        result.append((a_inv, b_inv, g.T @ a / n, g.mean(0)))
    return result


def _preconditioned(
    factors: list[tuple[Tensor, ...]], grads: list[tuple[Tensor, ...]]
) -> list[Tensor]:
    """``factors``' inverses applied to ``grads``' mean gradients (B^-1 G A^-1; B^-1 g_b)."""
    out = []
    for (a_inv, b_inv, _, _), (_, _, grad_w, grad_b) in zip(factors, grads, strict=True):
        out += [b_inv @ grad_w @ a_inv, b_inv @ grad_b]
    return out


def _data(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, dtype=torch.float64, generator=gen), torch.randint(
        0, 3, (16,), generator=gen
    )


def test_preconditioned_gradient_is_kfac_of_the_mean_loss() -> None:
    model = _mlp()
    x, y = _data(1)
    factors = _kfac(_mlp(), x, y, DAMPING)
    opt = AsdlKfac(model, model.parameters(), lr=0.1, damping=DAMPING)
    loss = opt.forward_backward(x, lambda logits: F.cross_entropy(logits, y))
    torch.testing.assert_close(loss, F.cross_entropy(_mlp()(x), y).detach())
    got = [p.grad for p in model.parameters()]
    for g, e in zip(got, _preconditioned(factors, factors), strict=True):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    # the preconditioning changed the gradient (the test would pass trivially otherwise)
    assert got[0] is not None
    assert float((got[0] - factors[0][2]).abs().max()) > 1e-3


def test_between_curvature_updates_the_mean_gradient_gets_the_last_factors() -> None:
    """Interval 2: the second step applies the first step's inverse factors to its own mean
    gradient (ASDL backpropagates the loss as given there: a summed loss would be 16x)."""
    model = _mlp()
    (x1, y1), (x2, y2) = _data(3), _data(4)
    opt = AsdlKfac(model, model.parameters(), lr=0.1, damping=DAMPING, interval=2)
    opt.forward_backward(x1, lambda logits: F.cross_entropy(logits, y1))
    opt.zero_grad()  # no optimizer step: the weights stay the initial ones
    loss = opt.forward_backward(x2, lambda logits: F.cross_entropy(logits, y2))
    torch.testing.assert_close(loss, F.cross_entropy(_mlp()(x2), y2).detach())
    expected = _preconditioned(_kfac(_mlp(), x1, y1, DAMPING), _kfac(_mlp(), x2, y2, DAMPING))
    for p, e in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, e, rtol=1e-8, atol=1e-10)


def test_bad_options_are_refused() -> None:
    model = _mlp()
    for options, message in (
        ({"damping": 0.0}, "damping"),
        ({"interval": 0}, "interval"),
        ({"interval": 1.5}, "interval"),
        ({"fisher": "exact"}, "fisher"),
    ):
        with pytest.raises(ValueError, match=message):
            AsdlKfac(model, model.parameters(), lr=0.1, **options)


def _config(*extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            "data.validation_size=128",
            "model.name=mlp",
            "model.width=32",
            "train.batch_size=128",
            "train.epochs=2",
            "train.progress=never",
            "optimizer.name=asdl-kfac",
            "optimizer.lr=0.05",
            *extra,
        ],
    )


def test_the_harness_trains_with_it_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    data = synthetic_dataset()
    result = TrainingRun(_config(), data, tmp_path / "run").run()
    assert result.status == "finished"
    assert result.steps == 10
    losses = [r["train_loss"] for r in result.history if r["train_loss"] is not None]
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigError, match="micro"):
        TrainingRun(_config("train.micro_batch_size=32"), data, tmp_path / "micro")
    with pytest.raises(ConfigError, match=r"asdl-kfac.*one process"):
        check_distributed(2, batch_sizes=[128], micro_batch_size=0, optimizers=["asdl-kfac"])
