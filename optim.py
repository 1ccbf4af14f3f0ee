"""
The optimizer side every trainer shares: the learning-rate schedule, AdamW, the batch order, and
the end of a step (metrics averaged, the gradient clipped and checked, the weights updated). The
forward pass, the loss and backward() stay in each trainer, where a reader looks for them.
"""
import math

import numpy as np
import torch
import torch.distributed as dist

from device import world_size


def seed_everything(seed):
    torch.manual_seed(seed)


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


def batch_indices(step, batch_size, n, seed):
    """The example indices of one step: a fresh permutation of range(n) each epoch, a pure function
    of the step, so a resumed run sees exactly the batches an uninterrupted run would."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    permutations = {int(e): np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return [int(permutations[int(e)][p % n]) for e, p in zip(epochs, positions)]


def add_metrics(totals, metrics, n_micro):
    """Accumulate one micro-batch's metrics (floats or tensors) into the step's means."""
    for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / n_micro


def apply_gradients(model, optimizer, metrics, lr, grad_clip, step):
    """End an optimizer step whose backward() passes are done: average the metrics over ranks,
    clip the gradient norm, stop before the weights change if the loss or gradient is not finite,
    then update at learning rate lr. Returns the metrics with the gradient norm added."""
    if dist.is_initialized():  # metrics of the global batch: the mean over ranks of equal shares
        names = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
        dist.all_reduce(values)
        metrics = dict(zip(names, (values / world_size()).tolist()))
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):  # the host waits here, once per optimizer step
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite {'loss' if not math.isfinite(metrics['loss']) else 'gradient'} at step {step} "
                                 f"(loss {metrics['loss']}, grad norm {grad_norm}): the learning rate is likely too high "
                                 f"or the data holds an empty sequence; the last good checkpoint is kept")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": grad_norm}
