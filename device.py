"""
Where the work runs: the device, bf16 autocast, the GPU's peak FLOP/s (for MFU), and data
parallelism under torchrun.

A plain `python script.py` is one process (world size 1) and the torchrun helpers change nothing.
Under `torchrun --nproc_per_node=N`, each process takes a slice of every global batch and of the
prompts it samples, DistributedDataParallel averages the gradients, and only rank 0 writes.
"""
import contextlib
import os
import platform
import re

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import UserError, check


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    return name


def check_model_fits(n_layer, n_embd, block_size, vocab_size=50257):
    """Refuse (ValueError), before anything is built, a model whose weights, gradients and AdamW
    moments (16 bytes per parameter) exceed this machine's memory."""
    params = 12 * n_layer * n_embd ** 2 + (vocab_size + block_size) * n_embd
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    check(16 * params <= have, f"a GPT with {n_layer} layers of width {n_embd} has {params / 1e9:.1f}B parameters and "
                               f"needs about {16 * params / 2**30:.0f} GiB to train, more than this machine's "
                               f"{have / 2**30:.0f} GiB; choose a smaller --n-layer or --n-embd")


def autocast(device, cache=True):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in float32); plain float32 on CPU. cache=False
    casts the weights at every use instead of once per context: what a CUDA graph replays must do so."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown (the CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    # datasheet dense bf16 peaks; the more specific names first ("H100 PCIe" before "H100", "L40S" before "L4")
    for key, flops in (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                       ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def hardware_name(device):
    """The GPU's name, or the CPU and its thread count: every reported figure names its hardware."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


# ---------------------------------------------------------------------------- data parallel (torchrun)
def setup_device(name="auto"):
    """pick_device, plus joining the process group when started by torchrun."""
    device = pick_device(name)
    if "RANK" in os.environ and not dist.is_initialized():
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"RANK is set but {', '.join(missing)} is not: start data parallel runs with torchrun "
                            f"(torchrun --nproc_per_node=N script.py), or unset RANK for one process")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized() and device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    return device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def local_slice(items):
    """This rank's share of a global batch or prompt list: items[rank::world_size]."""
    return items[rank()::world_size()]


def gather(local_items):
    """Inverse of local_slice: every rank gets the full list back in its original order."""
    if not dist.is_initialized():
        return list(local_items)
    shards = [None] * world_size()
    dist.all_gather_object(shards, list(local_items))
    total = sum(len(s) for s in shards)
    return [shards[i % len(shards)][i // len(shards)] for i in range(total)]


def data_parallel(model, device):
    """Wrap for DistributedDataParallel under torchrun; the model itself otherwise."""
    if not dist.is_initialized():
        return model
    return DDP(model, device_ids=[device] if device.startswith("cuda") else None)


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def check_divisible(batch, what):
    if batch % world_size():
        raise UserError(f"{what} {batch} must be divisible by the number of processes ({world_size()})")
