"""
The optimizer side every trainer shares: the learning-rate schedules, AdamW, the batch order, and
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


def linear_warmup(lr, step, warmup_steps):
    """The learning rate at step (from 0): a linear warm-up over warmup_steps, then constant (the DPO paper's)."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))


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


def step_seed(seed, step, stream):
    """A seed of its own for each (run seed, step, stream): a resumed run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def step_prompts(prompts, n, seed, step):
    """The n prompts of one step, drawn by (seed, step): with replacement only when there are fewer than n."""
    rng = np.random.default_rng([seed, step])
    return [prompts[i] for i in rng.choice(len(prompts), n, replace=len(prompts) < n)]


def add_metrics(totals, metrics, n_micro):
    """Accumulate one micro-batch's metrics (floats or tensors) into the step's means."""
    for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / n_micro


def mean_over_ranks(metrics):
    """Under torchrun, the metrics of the global batch: the mean over ranks of equal shares."""
    if not dist.is_initialized():
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(names, (values / world_size()).tolist()))


def check_finite(loss, grad_norm, step, optimizer):
    """Stop before the weights change if the loss or the gradient norm is not finite (the host waits
    here, once per optimizer step)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
                                 f"(loss {float(loss)}, grad norm {float(grad_norm)}): the learning rate is likely too high "
                                 f"or the data holds an empty sequence; the last good checkpoint is kept")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_gradients(model, optimizer, metrics, lr, grad_clip, step):
    """End an optimizer step whose backward() passes are done: average the metrics over ranks,
    clip the gradient norm, stop before the weights change if the loss or gradient is not finite,
    then update at learning rate lr. Returns the metrics with the gradient norm added."""
    metrics = mean_over_ranks(metrics)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")))
    check_finite(metrics["loss"], grad_norm, step, optimizer)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": grad_norm}
