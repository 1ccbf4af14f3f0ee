"""
Plumbing the training scripts share, so each of sft.py, reward.py and dpo.py reads as its own
method: flags from a config dataclass, device and bf16 autocast, the optimizer step with
gradient accumulation and clipping, atomic checkpoints, and one-line progress logs.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class UserError(Exception):
    """Bad input from the user (flags, files): printed as one line, exit code 2, no traceback."""


def run_main(main):
    """Call main(); turn user errors into a one-line message and a non-zero exit."""
    from data import DataError
    try:
        main()
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # a diverged run: say where and why, keep the last checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------- config and flags
def parse_config(config_cls, argv=None, presets=None, default_preset=None, description=None):
    """argparse generated from a config dataclass: one --flag per field, defaults shown in --help.
    A preset is a dict of overrides applied before the flags the user typed."""
    parser = argparse.ArgumentParser(description=description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                            help="a named set of overrides (default: by device)")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        overrides = ", ".join(f"{name} {values[f.name]}" for name, values in sorted((presets or {}).items()) if f.name in values)
        help_text = f.metadata.get("help", " ") + f" (default: {default}" + (f"; preset {overrides})" if overrides else ")")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            if default is None:
                kind = str
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    args = parser.parse_args(argv)
    values = dict(presets[args.preset]) if presets and args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    config = config_cls(**values)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return config


def check(condition, message):
    """Config validation: raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------- device
def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    return name


def autocast(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in float32); plain float32 on CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
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


# ---------------------------------------------------------------------------- data parallel (torchrun)
# A plain `python script.py` is one process (world size 1) and none of this changes anything.
# Under `torchrun --nproc_per_node=N`, each process takes a slice of every global batch and of the
# prompts it samples, DistributedDataParallel averages the gradients, and only rank 0 writes.
def setup_device(name="auto"):
    """pick_device, plus joining the process group when started by torchrun."""
    device = pick_device(name)
    if "RANK" in os.environ and not dist.is_initialized():
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


def seed_everything(seed):
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- optimisation
def warmup_cosine(step, warmup, total, lr, min_lr):
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def adamw(model, lr, weight_decay, betas, device):
    """AdamW with decay on matrices only (not biases, LayerNorm or position-free vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.startswith("cuda"))


def optimizer_step(model, optimizer, micro_batches, loss_fn, lr, grad_clip, device, step):
    """One optimizer step over gradient-accumulated micro-batches.
    loss_fn(batch) -> (loss, metrics dict of floats/tensors). Returns the averaged metrics and grad norm.
    A non-finite loss or gradient stops the run before the weights change."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = {}
    for batch in micro_batches:
        with autocast(device):
            loss, metrics = loss_fn(batch)
        (loss / len(micro_batches)).backward()
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / len(micro_batches)
    if dist.is_initialized():  # metrics of the global batch: the mean over ranks of equal shares
        names = sorted(totals)
        values = torch.tensor([totals[k] for k in names], dtype=torch.float64)
        dist.all_reduce(values)
        totals = dict(zip(names, (values / world_size()).tolist()))
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    if not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite {'loss' if not math.isfinite(totals['loss']) else 'gradient'} at step {step} "
                                 f"(loss {totals['loss']}, grad norm {grad_norm}): the learning rate is likely too high "
                                 f"or the data holds an empty sequence; the last good checkpoint is kept")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = grad_norm
    return totals


def batch_indices(step, batch_size, n, seed):
    """The example indices of one step: a fresh permutation of range(n) each epoch, a pure function
    of the step, so a resumed run sees exactly the batches an uninterrupted run would."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    permutations = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return [int(permutations[int(e)][p % n]) for e, p in zip(epochs, positions)]


# ---------------------------------------------------------------------------- files
def atomic_write(path, write):
    """write(file) into path.tmp in the same folder, fsync, then rename over path: a kill at any
    moment leaves the old file or the new one, never a torn one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, checkpoint):
    if is_main():
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    barrier()


def save_json(path, obj):
    if is_main():
        atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True): a checkpoint cannot run code. Clear errors for a missing,
    truncated or foreign file, or one of another kind (e.g. a reward model where a policy is expected)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # not a pickle, or one that names code (weights_only loads no functions or classes)
        raise UserError(f"{path} is not a readable checkpoint: it is not a file of tensors and plain containers "
                        f"(anything that would run code on loading is refused); pass a checkpoint written by this project") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                        f"it may be truncated or not from this project; retrain or pass another file") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no model and model_config entries)")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, but a {kind!r} one is needed here")
    return ckpt


def load_model(path, kinds=("sft", "dpo"), dropout=0.0):
    """A GPT from one of our checkpoints (sft or dpo by default), on the CPU, dropout off by default."""
    from model import GPT, GPTConfig
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") not in kinds:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint; expected one of {', '.join(kinds)}")
    model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": dropout}))
    load_state(model, ckpt["model"], path)
    return model


def resume(path, kind, cfg, keys, model, optimizer):
    """Continue a run from its checkpoint, if there is one: restore model, optimizer and RNG state
    and return (step, checkpoint); (0, None) for a fresh run. A checkpoint of another run (its
    config differs from cfg in any of `keys`) is refused, untouched."""
    if not os.path.exists(path):
        return 0, None
    ckpt = load_checkpoint(path, kind=kind)
    check_same_run(path, ckpt, cfg, keys)
    load_state(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    print0(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt


def check_same_run(path, ckpt, cfg, keys):
    """A checkpoint whose config differs from cfg in any of `keys` belongs to another run: refused, untouched."""
    saved = ckpt["config"]
    differs = [f"{k}: {saved.get(k)} vs {getattr(cfg, k)}" for k in keys if saved.get(k) != getattr(cfg, k)]
    if differs:
        raise UserError(f"{path} belongs to a run with a different config ({', '.join(differs)}); "
                        f"use another --out, or move that file away to start over")


def training_checkpoint(kind, model, optimizer, cfg, step, **extra):
    """What a checkpoint holds: enough to rebuild the model and continue the same trajectory."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": dataclasses.asdict(model.config), "config": dataclasses.asdict(cfg),
            "step": step, "rng": rng_state(), **extra}


def load_state(module, state, path):
    """load_state_dict with an error that names the file when sizes or names differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model (different size or architecture): {str(e)[:300]}") from None


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- progress
def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line per log interval (step/total, metrics, rate, ETA), plus the same numbers as JSON lines."""

    def __init__(self, name, total, log_path=None, unit="tok", start_step=0):
        self.name, self.total, self.log_path, self.unit = name, total, log_path, unit
        self.last_step = start_step
        self.t0 = self.last_t = time.time()
        self.count = 0  # units (tokens, pairs, reviews) since the last line

    def add(self, units):
        """Count the units (tokens, pairs) one step processed."""
        self.count += units

    def line(self, step, metrics, show=None, peak_flops=None, flops_per_unit=None):
        """Print one line (the metrics named in `show`, default all) and record all of them.
        Rate and ETA are measured since the previous line; MFU where the peak is known."""
        if not is_main():
            return
        now = time.time()
        rate = self.count / max(now - self.last_t, 1e-9)
        steps_per_s = (step - self.last_step) / max(now - self.last_t, 1e-9)
        eta = (self.total - step) / max(steps_per_s, 1e-9)
        row = {"step": step, **metrics, f"{self.unit}_per_s": rate, "time": now - self.t0}
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in metrics.items() if show is None or k in show)
        mfu = ""
        if peak_flops and flops_per_unit:
            row["mfu"] = rate * flops_per_unit / peak_flops
            mfu = f" | mfu {row['mfu']:.1%}"
        print(f"{self.name} step {step}/{self.total} | {shown} | {_si(rate)} {self.unit}/s{mfu} | eta {format_seconds(eta)}", flush=True)
        self.record(row)
        self.last_t, self.last_step, self.count = now, step, 0

    def record(self, row):
        if self.log_path and is_main():
            os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _si(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"
