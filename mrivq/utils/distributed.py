"""Training on several processes with PyTorch's own engine: ``torchrun ... -m mrivq train``.

``torchrun`` starts one process per GPU (``--nproc_per_node``) on each machine (``--nnodes`` with a
rendezvous) and tells each its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. :func:`init_from_env` joins
them into one process group (NCCL on GPUs, gloo on CPUs) and picks the process's GPU. From then on:

- ``train.batch_size`` is the **global** batch: each step's batch (a pure function of the step, as in one
  process) is cut into equal, contiguous shares, one per rank (:func:`shard`), so N GPUs compute what
  one process would, N times faster, and a run gives the same model whatever the number of GPUs;
- gradients are averaged by ``DistributedDataParallel``; the EMA codebook gathers every rank's encoder
  outputs (:class:`mrivq.models.quantizer.VectorQuantizerEMA`);
- every rank validates (on the whole validation set: MONAI's metrics gather over ranks), but only rank
  0 writes checkpoints, metrics, previews, progress and run.json; the others wait for it where they need
  what it wrote (:func:`barrier`);
- a signal on any rank stops every rank at the same step (:func:`any_rank`), and ``--resume`` works as in
  one process. A rank that fails exits; torchrun then stops the others and names the failed rank.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from mrivq.utils.errors import MrivqError

TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer than this fails instead of hanging


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> str:
    """Join torchrun's process group if launched by it; returns the device this process should use
    (``cuda:LOCAL_RANK`` on GPUs). Without torchrun it does nothing and returns ``device``."""
    if not launched() or active():
        return device
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise MrivqError("--device cuda asked for under torchrun, but no CUDA GPU is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise MrivqError(f"torchrun started local rank {local} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a run folder's name, a decision)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process). A collective: every
    rank must call it (each rank's RNG state for a checkpoint)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a signal, a non-finite loss)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a global batch; the batch must split evenly."""
    n = world()
    if n == 1:
        return indices
    if len(indices) % n:
        raise MrivqError(f"the global batch of {len(indices)} does not split over {n} processes; set "
                         f"train.batch_size (and prior.train.batch_size) to a multiple of {n}")
    k = len(indices) // n
    return indices[rank() * k:(rank() + 1) * k]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun (gradients averaged over ranks), else ``model``.
    Buffers are not re-broadcast each step: the codebook keeps every rank in step itself."""
    if not active():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # the buffers are identical on every rank at the start (same seed), so syncing them at init is harmless
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel.__init__).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **no_sync)


def average_gradients(params: Any) -> None:
    """Average the gradients of ``params`` over ranks (a model trained outside DDP, e.g. a discriminator)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world()


def label() -> str:
    """``"rank R: "`` in a process started by torchrun (so a message names its process), else ``""``."""
    return f"rank {os.environ['RANK']}: " if launched() and int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""


def peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that broke because another rank died (gloo/NCCL connection lost)."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted"))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
