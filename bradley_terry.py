"""
The reward model of RLHF, the stage DPO removes (Sec. 3 of the paper; Ziegler et al. 2019):
a reward r(x, y) learned from the preference pairs through the Bradley-Terry model (Eq. 1)
    p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)),
by maximum likelihood (Eq. 2):
    L_R = -E_(x, y_w, y_l) log sigma(r(x, y_w) - r(x, y_l)).
The model is the SFT model's trunk with a scalar head (reward.GPTClassifier: its logit is r).
It trains on the training pairs; its accuracy on held-out pairs, measured as it goes, picks the
weights that are kept. PPO (ppo.py) maximises it; Best-of-N selects with it. DPO needs none of
this: by Eq. 5 the policy is its own reward model, and train.py reports both accuracies side by side.

    python bradley_terry.py --pairs my_pairs.jsonl --heldout my_heldout.jsonl --out out/my_rm   # -> out/my_rm/rm.pt
"""
import copy
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import append_jsonl, check_same_run, load_checkpoint, load_model, run_identity, save_checkpoint
from cli import check, parse_config, run_main
from device import autocast, check_divisible, data_parallel, local_slice, print0, setup_device
from dpo import read_pairs
from model import left_pad
from optim import adamw, apply_gradients, batch_indices, seed_everything, warmup_cosine
from progress import Progress
from reward import GPTClassifier

# the settings that define a reward model: a finished one stands for its run
RUN_FIELDS = ("sft", "pairs", "heldout", "epochs", "batch_size", "lr", "warmup_steps", "weight_decay", "seed")


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Eq. 2 per pair (B,): -log sigma(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def pair_rows(pairs, device):
    """[prompt + chosen for each pair; prompt + rejected for each pair], left-padded: ids, mask (2B, T)."""
    return left_pad([p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs], device=device)


@torch.no_grad()
def pair_accuracy(model, pairs, batch_size=256):
    """How often r(x, y_w) > r(x, y_l) (a tie counts one half)."""
    device = next(model.parameters()).device
    hits = []
    for i in range(0, len(pairs), batch_size):
        ids, mask = pair_rows(pairs[i:i + batch_size], device)
        with autocast(device.type):
            chosen, rejected = model(ids, mask).float().chunk(2)
        hits.append(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).cpu())
    return float(torch.cat(hits).mean())


@dataclass
class BradleyTerryConfig:
    sft: str = field(default="out/sft.pt", metadata={"help": "SFT checkpoint whose trunk starts the reward model"})
    pairs: str = field(default="out/pairs.jsonl", metadata={"help": "training preference JSONL (prompt, chosen, rejected)"})
    heldout: str = field(default="out/heldout_pairs.jsonl", metadata={"help": "held-out preference JSONL: picks the weights kept"})
    out: str = field(default="out", metadata={"help": "run folder (OUT/NAME.pt: out/rm.pt, where train.py writes it)"})
    name: str = field(default="rm", metadata={"help": "OUT/NAME.pt, OUT/NAME_log.jsonl"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps, then cosine to lr/10"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 = off)"})
    evals: int = field(default=8, metadata={"help": "held-out evaluations over the run (the best one is kept)"})
    seed: int = field(default=0, metadata={"help": "random seed (pair order)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self):
        check(self.epochs > 0 and self.batch_size > 0 and self.evals > 0, "--epochs, --batch-size and --evals must be positive")
        check(self.lr > 0 and self.warmup_steps >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
              "--lr must be > 0; --warmup-steps, --weight-decay and --grad-clip >= 0")


def train_bradley_terry(cfg):
    """Train the reward model and save the weights with the best held-out accuracy, frozen; returns
    (checkpoint path, {"train_acc", "heldout_acc", "step"} of those weights). A finished checkpoint
    of the same run is returned as it is; a killed run starts over (it is the cheapest stage)."""
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    identity = run_identity(cfg, RUN_FIELDS)
    if os.path.exists(ckpt_path):  # only ever written finished
        ckpt = load_checkpoint(ckpt_path, kind="reward")
        check_same_run(ckpt_path, ckpt.get("run", {}), identity)
        return ckpt_path, ckpt["accuracy"]
    device = setup_device(cfg.device)
    check_divisible(cfg.batch_size, "--batch-size")
    sft = load_model(cfg.sft, kinds=("sft",))
    pairs, heldout = read_pairs(cfg.pairs, sft.config.block_size), read_pairs(cfg.heldout, sft.config.block_size)
    seed_everything(cfg.seed)
    model = GPTClassifier(sft.config)
    model.gpt.load_state_dict(sft.state_dict())
    model.gpt.transformer.wte.requires_grad_(False)  # the token embedding stays as SFT learned it (see ppo.Critic)
    model.to(device).train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.99), device)
    forward = data_parallel(model, device)  # under torchrun; the model itself otherwise
    total = max(1, int(cfg.epochs * len(pairs) / cfg.batch_size))
    eval_steps = {int(round(total * (i + 1) / cfg.evals)) for i in range(cfg.evals)}
    progress = Progress(cfg.name, total, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="pairs")
    best = {"heldout_acc": -1.0}
    for step in range(total):
        batch = [pairs[i] for i in local_slice(batch_indices(step, cfg.batch_size, len(pairs), cfg.seed))]
        ids, mask = pair_rows(batch, device)  # (2B, T): [chosen; rejected]
        lr = warmup_cosine(step, cfg.warmup_steps, total, cfg.lr, cfg.lr / 10)
        with autocast(device):
            chosen_rewards, rejected_rewards = forward(ids, mask).float().chunk(2)  # r(x, y_w), r(x, y_l): (B,) each
        loss = bradley_terry_loss(chosen_rewards, rejected_rewards).mean()  # Eq. 2
        loss.backward()
        metrics = apply_gradients(model, optimizer, {"loss": loss.item(),
                                                     "acc": (chosen_rewards > rejected_rewards).float().mean().item()},
                                  lr, cfg.grad_clip, step)
        progress.add(cfg.batch_size)
        if step + 1 in eval_steps:
            model.eval()
            heldout_acc = pair_accuracy(model, heldout)
            model.train()
            progress.line(step + 1, {**metrics, "heldout_acc": heldout_acc, "lr": lr})
            if heldout_acc >= best["heldout_acc"]:  # the best held-out weights are kept (the later, on a tie)
                best = {"heldout_acc": heldout_acc, "step": step + 1, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("state"))
    model.eval()
    sample = [pairs[i] for i in np.random.default_rng(cfg.seed).permutation(len(pairs))[:len(heldout)]]
    accuracy = {"train_acc": pair_accuracy(model, sample), **best}  # train: as many training pairs as held out
    print0(f"{cfg.name}: Bradley-Terry reward model from step {best['step']}/{total}: pair accuracy "
           f"{accuracy['heldout_acc']:.3f} held out, {accuracy['train_acc']:.3f} on training pairs")
    append_jsonl(os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), {"step": total, **accuracy})
    save_checkpoint(ckpt_path, {"kind": "reward", "classifier": "bradley_terry", "model": model.state_dict(),
                                "model_config": asdict(model.config), "config": asdict(cfg), "run": identity,
                                "accuracy": accuracy})
    return ckpt_path, accuracy


def main():
    cfg = parse_config(BradleyTerryConfig, description="Train RLHF's Bradley-Terry reward model on preference pairs.")
    path, accuracy = train_bradley_terry(cfg)
    print0(f"checkpoint: {path} (held-out pair accuracy {accuracy['heldout_acc']:.3f})")


if __name__ == "__main__":
    run_main(main)
