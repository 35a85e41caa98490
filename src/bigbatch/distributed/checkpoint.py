"""Sharded optimizer checkpoints through ``torch.distributed.checkpoint`` (DCP).

``opt.state_dict()`` of SPNGD (or NLCG with the K-FAC preconditioner) in hybrid mode is a
collective that gathers every owner's Fisher blocks onto every rank, for a rank-0
``torch.save``. :func:`save_sharded` instead has each rank write only what it keeps: the
statistics and inverses of the blocks it owns (replicated entries such as momentum buffers
are written once, DCP's de-duplication), with no gather of curvature tensors::

    import bigbatch.distributed.checkpoint as bbdcp
    bbdcp.save_sharded(opt, "ckpt/optim")            # every rank calls it
    torch.distributed.checkpoint.save(model.state_dict(), checkpoint_id="ckpt/model")
    ...
    bbdcp.load_sharded(opt, "ckpt/optim")            # every rank; reads its own blocks

Loading reads on each rank the blocks that rank owns now, so a checkpoint written by W
ranks loads on any other number of ranks, or in one process. The non-tensor part (param
groups, schedules, counters) travels as one pickled byte tensor read back with
``torch.load(weights_only=True)``; nothing else is unpickled. Any optimizer works (without a
curvature engine everything is replicated and written once).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.optim import Optimizer

from bigbatch.curvature.engine import STATE_FORMAT, KFACEngine

__all__ = ["SKELETON_KEY", "load_sharded", "save_sharded"]

#: the DCP entry holding the state's structure and its non-tensor values
SKELETON_KEY = "bigbatch/skeleton"
_FORMAT = 1
_TENSOR = "__bigbatch_dcp_tensor__"  # a tensor leaf's placeholder in the skeleton
_PREFIX = "bigbatch/state/"

PathLike = str | os.PathLike[str]


def engine_of(optimizer: Optimizer) -> KFACEngine | None:
    """The curvature engine of SPNGD or of NLCG's K-FAC preconditioner, if any."""
    for holder in (optimizer, getattr(optimizer, "preconditioner", None)):
        engine = getattr(holder, "engine", None)
        if isinstance(engine, KFACEngine):
            return engine
    return None


def save_sharded(optimizer: Optimizer, checkpoint_id: PathLike) -> None:
    """Write ``optimizer``'s state to the DCP directory ``checkpoint_id``; each rank writes
    the curvature blocks it owns. A collective: every rank of the process group calls it."""
    engine = engine_of(optimizer)
    with engine.share_only() if engine is not None else nullcontext():
        state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    owners: dict[str, str | None] = {}
    skeleton = _split(state, (), tensors, owners, None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, (skeleton, owners))
        skeleton, owners = shares[0][0], {}
        for other, their_owners in shares:
            skeleton = _merge(skeleton, other)
            owners.update(their_owners)
    header = {
        "format": _FORMAT,
        "optimizer": type(optimizer).__name__,
        "state": skeleton,
        "owners": owners,
    }
    buffer = io.BytesIO()
    torch.save(header, buffer)
    blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    dcp_save({SKELETON_KEY: blob, **tensors}, checkpoint_id=os.fspath(checkpoint_id))


def load_sharded(optimizer: Optimizer, checkpoint_id: PathLike) -> None:
    """Restore :func:`save_sharded`'s checkpoint into ``optimizer`` (a collective). The
    optimizer validates the state before changing anything, as ``load_state_dict`` does."""
    path = os.fspath(checkpoint_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"sharded optimizer checkpoint {path!r}: no such directory")
    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    entry = metadata.get(SKELETON_KEY)
    if not isinstance(entry, TensorStorageMetadata):
        raise ValueError(
            f"{path!r} is not a bigbatch sharded optimizer checkpoint (no {SKELETON_KEY!r} "
            "entry; it was not written by bigbatch.distributed.checkpoint.save_sharded)"
        )
    blob = torch.empty(entry.size, dtype=torch.uint8)
    dcp_load({SKELETON_KEY: blob}, checkpoint_id=path)
    header = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    if not isinstance(header, Mapping) or header.get("format") != _FORMAT:
        raise ValueError(f"{path!r}: unknown sharded checkpoint layout")
    if header["optimizer"] != type(optimizer).__name__:
        raise ValueError(
            f"{path!r} holds the state of a {header['optimizer']}, not of this "
            f"{type(optimizer).__name__}"
        )
    engine = engine_of(optimizer)
    device = optimizer.param_groups[0]["params"][0].device
    wanted: dict[str, Tensor] = {}
    for name, block in header["owners"].items():
        if block is not None and engine is not None and not engine.strategy.owns(block):
            continue
        meta = metadata.get(name)
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"{path!r}: tensor {name!r} is missing (an incomplete checkpoint?)")
        wanted[name] = torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    if wanted:
        dcp_load(wanted, checkpoint_id=path)
    optimizer.load_state_dict(_fill(header["state"], wanted))


def _split(
    obj: Any,
    path: tuple[Any, ...],
    tensors: dict[str, Tensor],
    owners: dict[str, str | None],
    block: str | None,
) -> Any:
    """``obj`` with each tensor replaced by a placeholder naming its DCP entry; the tensors
    go to ``tensors``, and the curvature block each belongs to (None: replicated) to
    ``owners``."""
    if isinstance(obj, Tensor):
        name = _PREFIX + "/".join(str(part) for part in path)
        if name in tensors:
            raise ValueError(f"optimizer state has two entries named {name!r}")
        tensors[name] = obj
        owners[name] = block
        return {_TENSOR: name}
    if isinstance(obj, Mapping):
        engine_state = obj.get("format") == STATE_FORMAT and "stats" in obj and "inverses" in obj
        out = {}
        for key, value in obj.items():
            per_block = engine_state and key in ("stats", "inverses") and isinstance(value, Mapping)
            if per_block:
                out[key] = {
                    b: _split(v, (*path, key, b), tensors, owners, str(b)) for b, v in value.items()
                }
            else:
                out[key] = _split(value, (*path, key), tensors, owners, block)
        return out
    if isinstance(obj, list | tuple):
        items = [_split(v, (*path, i), tensors, owners, block) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def _merge(a: Any, b: Any) -> Any:
    """The union of two ranks' skeletons (their shares differ in the blocks each owns)."""
    if isinstance(a, dict) and isinstance(b, dict) and _TENSOR not in a:
        out = dict(a)
        for key, value in b.items():
            out[key] = _merge(out[key], value) if key in out else value
        return out
    return a


def _fill(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The state with each placeholder replaced by its loaded tensor; entries whose tensor
    this rank did not load (another owner's blocks) are left out."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors.get(skeleton[_TENSOR])
        out = {}
        for key, value in skeleton.items():
            filled = _fill(value, tensors)
            if filled is None and isinstance(value, dict) and _TENSOR in value:
                continue
            out[key] = filled
        return out
    if isinstance(skeleton, list | tuple):
        items = [_fill(v, tensors) for v in skeleton]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton
