"""Tests of :mod:`bigbatch.train.ema`: the EMA after three updates, computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigbatch.train.ema import make_ema


def test_ema_after_three_updates_equals_hand_average() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    d = 0.9
    ema = make_ema(model, d)
    snapshots = []
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(k + 1))  # weights 1, 2, 3 at the three updates
            bn = model[1]
            assert isinstance(bn, nn.BatchNorm1d)
            bn.running_mean.fill_(10.0 * (k + 1))  # type: ignore[operator]
        snapshots.append(k + 1)
        ema.update_parameters(model)
    # First update copies (1); then 0.9 * 1 + 0.1 * 2 = 1.1; then 0.9 * 1.1 + 0.1 * 3 = 1.29.
    expected = d * d * 1 + d * (1 - d) * 2 + (1 - d) * 3
    assert expected == pytest.approx(1.29)
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.29))
    # Buffers are averaged too: 10x the weights.
    bn_ema = ema.module[1]
    torch.testing.assert_close(bn_ema.running_mean, torch.full((2,), 12.9))
    # The model itself is untouched by the averaging.
    for p in model.parameters():
        assert torch.all(p == 3.0)


def test_ema_is_a_copy_and_state_round_trips() -> None:
    model = nn.Linear(2, 2)
    ema = make_ema(model, 0.5)
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update_parameters(model)
    restored = make_ema(nn.Linear(2, 2), 0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.module.weight, model.weight - 1.0)
    assert int(restored.n_averaged) == 2


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_bad_decay(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        make_ema(nn.Linear(1, 1), decay)
