"""Data-parallel training under ``torchrun``: process group set-up and batch statistics
synchronised across processes (torch's ``nn.SyncBatchNorm`` runs only on GPUs; this one
runs on any device, gloo on CPU included)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> Context:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU); a plain
    single process when not launched by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def data_parallel(model: nn.Module, context: Context, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel; ``model`` itself in a single process.

    On gloo, DDP gets a process group of its own. DDP keeps the group it is given alive after
    ``destroy_process_group`` (torch 2.13 and 2.14: its gloo threads outlive every Python
    reference), so that group's threads are still running when the interpreter shuts down.
    A gloo thread that then frees a finished collective whose tensor Python had created needs
    the GIL, Python ends the thread, and the process aborts ("terminate called without an
    active exception"). DDP's own collectives hold only its C++ gradient buckets; ours
    (losses, batch statistics, barriers) run on the default group, which :func:`shutdown`
    destroys and joins while Python is alive. NCCL's shutdown stops its threads itself."""
    if not context.enabled:
        return model
    group = dist.new_group(backend="gloo") if dist.get_backend() == "gloo" else None
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def shutdown(context: Context) -> None:
    """Leave the process group: the default group's threads are joined here."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: Tensor, context: Context, op=None) -> Tensor:
    """Sum (or ``op``) over processes, no gradient, in place; returns ``t``. CPU tensors
    travel through the GPU when the backend is NCCL, which only reduces CUDA tensors."""
    if not context.enabled:
        return t
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend() == "nccl" and not t.is_cuda:
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        t.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(t, op=op)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each input is the sum of the output gradients
    of all processes."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch
    across all processes. Same parameters, buffers and state_dict keys; with one process
    it is exactly BatchNorm2d. Gradients flow through the all-reduces (their backward
    sums the gradients of every process), so they equal one process on the global batch."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects [N, C, H, W], got shape {tuple(x.shape)}")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        local_count = torch.tensor([float(x.numel() // x.shape[1])], dtype=acc, device=x.device)
        stats = torch.cat([local_count, xf.sum((0, 2, 3))])
        stats = differentiable_all_reduce(stats)
        count, mean = stats[0], stats[1:] / stats[0]
        centred = xf - mean.view(1, -1, 1, 1)
        var = differentiable_all_reduce((centred * centred).sum((0, 2, 3))) / count
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`SyncBatchNorm2d`, and switch
    segnet_ext's fused blocks to synchronised statistics (in place)."""
    import segnet_ext

    taken_over = {id(m.bn) for m in module.modules() if isinstance(m, segnet_ext.FusedConv2d)}
    for name, child in module.named_children():
        if isinstance(child, (segnet_ext.ConvBNReLU2d, segnet_ext.FusedConv2d)):
            child.sync_bn = True  # the fused block synchronises its own statistics
        elif type(child) is nn.BatchNorm2d and id(child) not in taken_over:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.to(next(iter(child.buffers()), torch.empty(0)).device)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
