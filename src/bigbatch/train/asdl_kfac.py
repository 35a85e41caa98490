"""ASDL's K-FAC (PyPI ``asdfghjkl``, module ``asdl``), the peer K-FAC of issue 14's study,
as a harness optimizer: momentum SGD on the gradients ASDL's ``KfacGradientMaker``
preconditions.

ASDL runs the forward and backward pass itself (its hooks capture the layers' inputs and
output gradients), so the loop calls :meth:`AsdlKfac.forward_backward` instead of its own
(the ``forward_backward`` capability). On its curvature steps ASDL asks the loss function
for the loss *summed* over the ``data_size`` samples and divides by it; here the loss
function answers that from the loop's mean loss, so the gradients are the mean loss's on
every step and the empirical Fisher factors are means over the batch. Damping is ASDL's
factored Tikhonov damping (split between the two Kronecker factors by the ratio of their
mean eigenvalues) on the Kronecker-factored layers (Linear, Conv2d); normalisation layers
get ASDL's unit-wise blocks with plain damping. tests/test_asdl_kfac.py checks the Linear
case against a dense float64 K-FAC.

Limits (refused with a message, not worked around): one process (ASDL partitions the
model over ranks itself when ``torch.distributed`` is initialised), no micro-batches (each
forward would refresh the curvature from a part of the batch), and a checkpoint holds the
momentum but not ASDL's curvature or step counter: a resumed run rebuilds the curvature at
its first step and, with ``interval`` > 1, updates it on a shifted schedule, so it is not
the uninterrupted run. ASDL is a benchmark extra:
``pip install --no-deps --pre asdfghjkl==0.1a5``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bigbatch.train.config import ConfigError

__all__ = ["INSTALL", "AsdlKfac"]

INSTALL = "pip install --no-deps --pre asdfghjkl==0.1a5"


def _asdl() -> Any:
    try:
        import asdl
    except ImportError as exc:  # an optional benchmark extra
        raise ConfigError(
            f"optimizer.name='asdl-kfac' needs ASDL (PyPI asdfghjkl): {INSTALL} ({exc})"
        ) from None
    return asdl


class AsdlKfac(torch.optim.SGD):
    """SGD with momentum whose gradients are ASDL's K-FAC-preconditioned ones.

    ``interval``: steps between ASDL's curvature and inverse updates (1 = every step, its
    default); ``damping``: ASDL's damping; ``fisher``: ``"emp"`` (empirical) or ``"mc"``
    (one Monte Carlo sample)."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any],
        lr: float,
        *,
        momentum: float = 0.9,
        damping: float = 1e-3,
        interval: int = 1,
        fisher: str = "emp",
    ) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a whole number >= 1, got {interval!r}")
        fishers = {"emp": "FISHER_EMP", "mc": "FISHER_MC"}
        if fisher not in fishers:
            raise ValueError(f"fisher must be one of {sorted(fishers)}, got {fisher!r}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError("ASDL's K-FAC runs in one process here (not under torchrun)")
        super().__init__(params, lr=lr, momentum=momentum)
        asdl = _asdl()
        self.model = model
        self.config = asdl.PreconditioningConfig(
            data_size=1,  # set to each batch's size in forward_backward
            damping=damping,
            preconditioner_upd_interval=interval,
            curvature_upd_interval=interval,
        )
        try:
            self.grad_maker = asdl.KfacGradientMaker(
                model, self.config, fisher_type=getattr(asdl, fishers[fisher])
            )
        except AssertionError as exc:  # asdfghjkl 0.1a5 asserts on layers it cannot take
            raise ValueError(f"ASDL's K-FAC cannot precondition this model: {exc}") from None

    def forward_backward(self, x: Tensor, mean_loss: Callable[[Tensor], Tensor]) -> Tensor:
        """Forward ``x``, the mean loss ``mean_loss(logits)`` and its backward through ASDL,
        leaving the preconditioned gradients in ``.grad``; the mean loss (detached)."""
        n = int(x.shape[0])
        self.config.data_size = n
        gm = self.grad_maker

        def loss_fn(out: Tensor, reduction: str = "mean") -> Tensor:
            # ASDL asks for the loss summed over the batch on its curvature steps (and
            # divides the gradients and the loss by data_size); elsewhere it keeps the mean
            if reduction not in ("mean", "sum"):
                raise ValueError(f"reduction {reduction!r}: 'mean' or 'sum'")
            mean = mean_loss(out)
            return mean * n if reduction == "sum" else mean

        logits = gm.setup_model_call(self.model, x)
        gm.setup_loss_call(loss_fn, logits)
        _, loss = gm.forward_and_backward()
        value: Tensor = loss.detach()  # the mean either way
        return value


def forward_backward(
    optimizer: torch.optim.Optimizer, x: Tensor, mean_loss: Callable[[Tensor], Tensor]
) -> Tensor:
    """The loop's ``forward_backward`` capability for :class:`AsdlKfac`."""
    if not isinstance(optimizer, AsdlKfac):
        raise TypeError(f"forward_backward is ASDL K-FAC's, not {type(optimizer).__name__}'s")
    return optimizer.forward_backward(x, mean_loss)
