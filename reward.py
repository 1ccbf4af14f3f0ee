"""
The ground-truth reward of the IMDb experiment: r(x, y) = P(positive | x + y) from a sentiment
classifier, as in the paper (which used a RoBERTa classifier; ours is the GPT trunk, initialised
from the SFT model, with a linear head on its mean-pooled features). It is trained on the 25k
labelled train reviews, tested on the 25k test reviews, then frozen; it never shares weights
with the policy.

    python reward.py                   # after python sft.py: out/sft/sft.pt -> out/reward/reward.pt
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_model, load_state, model_config, resume, save_checkpoint, training_checkpoint
from cli import UserError, check, parse_config, run_main
from data import load_imdb
from device import autocast, check_divisible, data_parallel, gather, local_slice, print0, setup_device
from model import GPT, left_pad
from optim import adamw, apply_gradients, batch_indices, seed_everything, warmup_cosine
from progress import Progress

# a checkpoint continues only the run these settings define
RESUME_FIELDS = ("sft", "max_len", "min_len", "batch_size", "max_steps", "lr", "seed")


class RewardModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)  # only the trunk is used; the tied LM head adds no parameters
        self.head = nn.Linear(config.n_embd, 1)

    def forward(self, idx, attention_mask):
        """Logit of P(positive) per row (B,), from left-padded ids and their attention mask (B, T)."""
        features = self.gpt.hidden_states(idx, attention_mask)  # (B, T, C)
        weights = attention_mask.unsqueeze(-1).to(features.dtype)  # (B, T, 1): average real tokens only
        pooled = (features * weights).sum(1) / weights.sum(1)  # (B, C)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def score(self, sequences, batch_size=256):
        """r(x, y) = P(positive | tokens) for each token list, as a float64 numpy array in [0, 1]."""
        device = next(self.parameters()).device
        limit = self.gpt.config.block_size
        out = [torch.zeros(0)]
        for i in range(0, len(sequences), batch_size):
            ids, mask = left_pad([s[:limit] for s in sequences[i:i + batch_size]], device=device)
            with autocast(device.type):
                out.append(torch.sigmoid(self(ids, mask).float()).cpu())
        return torch.cat(out).double().numpy()


def load_reward_model(path):
    ckpt = load_checkpoint(path, kind="reward")
    model = RewardModel(model_config(ckpt, path))
    load_state(model, ckpt["model"], path)
    return model.eval().requires_grad_(False)


@dataclass
class RewardConfig:
    sft: str = field(default="out/sft/sft.pt", metadata={"help": "SFT checkpoint whose trunk starts the classifier (default: where sft.py writes)"})
    out: str = field(default="out/reward", metadata={"help": "run folder: OUT/reward.pt, OUT/reward_log.jsonl"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder (else $IMDB_ARCHIVE, data/, download)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive"})
    max_len: int = field(default=64, metadata={"help": "longest review prefix the classifier reads, in tokens"})
    min_len: int = field(default=8, metadata={"help": "shortest random crop during training (rewards score short texts)"})
    batch_size: int = field(default=32, metadata={"help": "reviews per step"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps, then cosine to lr/10"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 = off)"})
    test_reviews: int = field(default=2000, metadata={"help": "test reviews scored for accuracy (0 = all 25k)"})
    log_interval: int = field(default=50, metadata={"help": "steps between progress lines"})
    save_interval: int = field(default=200, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (data order and crops)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self):
        for name in ("max_len", "min_len", "batch_size", "max_steps", "log_interval", "save_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.min_len <= self.max_len, f"--min-len {self.min_len} must not exceed --max-len {self.max_len}")
        check(self.lr > 0 and self.test_reviews >= 0, "--lr must be > 0 and --test-reviews >= 0")


def crops(split, indices, min_len, max_len, seed):
    """The first L tokens of each review, L uniform in [min_len, max_len] (the whole review if shorter)."""
    rng = np.random.default_rng(seed)
    return [split.review(i)[:int(rng.integers(min_len, max_len + 1))].tolist() for i in indices]


def accuracy(model, split, n, max_len):
    """Fraction of the first n reviews of a labelled split (or all) classified correctly from their first max_len tokens."""
    rng = np.random.default_rng(0)
    indices = rng.permutation(len(split))[:n] if n else np.arange(len(split))
    sequences = [split.review(i)[:max_len].tolist() for i in indices]
    scores = np.array(gather(model.score(local_slice(sequences)).tolist()))  # each rank scores a share
    return float(((scores > 0.5) == (split.labels[indices] == 1)).mean())


def train_reward(cfg, imdb):
    """Fine-tune the classifier on the labelled train split; returns (checkpoint path, test accuracy)."""
    device = setup_device(cfg.device)
    check_divisible(cfg.batch_size, "--batch-size")
    if cfg.test_reviews > len(imdb["test"]):
        raise UserError(f"--test-reviews {cfg.test_reviews} exceeds the {len(imdb['test'])} test reviews in the data")
    ckpt_path = os.path.join(cfg.out, "reward.pt")
    sft = load_model(cfg.sft, kinds=("sft",))
    if cfg.max_len > sft.config.block_size:
        raise UserError(f"--max-len {cfg.max_len} exceeds the SFT model's context of {sft.config.block_size}")
    seed_everything(cfg.seed)
    model = RewardModel(sft.config)
    model.gpt.load_state_dict(sft.state_dict())
    model.to(device).train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.99), device)
    train = imdb["train"]
    step, ckpt = resume(ckpt_path, "reward", cfg, RESUME_FIELDS, model, optimizer)
    if ckpt and ckpt["test_accuracy"] is not None:
        return ckpt_path, ckpt["test_accuracy"]
    train_forward = data_parallel(model, device)  # under torchrun; the model itself otherwise

    def save(test_accuracy=None):
        save_checkpoint(ckpt_path, training_checkpoint("reward", model, optimizer, cfg, RESUME_FIELDS, step, test_accuracy=test_accuracy))

    progress = Progress("reward", cfg.max_steps, os.path.join(cfg.out, "reward_log.jsonl"), unit="reviews", start_step=step)
    while step < cfg.max_steps:
        indices = batch_indices(step, cfg.batch_size, len(train), cfg.seed)
        texts = local_slice(crops(train, indices, cfg.min_len, cfg.max_len, [cfg.seed, step]))
        ids, mask = left_pad(texts, device=device)  # this rank's share of the global batch
        labels = torch.tensor(train.labels[local_slice(indices)], dtype=torch.float32, device=device)
        lr = warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.lr, cfg.lr / 10)
        with autocast(device):
            logits = train_forward(ids, mask)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)  # -log P(label | review)
        loss.backward()
        batch_acc = ((logits > 0).float() == labels).float().mean()
        metrics = apply_gradients(model, optimizer, {"loss": loss.item(), "acc": batch_acc.item()}, lr, cfg.grad_clip, step)
        step += 1
        progress.add(cfg.batch_size)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            progress.line(step, {**metrics, "lr": lr})
        if step % cfg.save_interval == 0 and step < cfg.max_steps:
            save()
    model.eval()
    test_accuracy = accuracy(model, imdb["test"], cfg.test_reviews, cfg.max_len)
    print0(f"reward model test accuracy {test_accuracy:.3f} on {cfg.test_reviews or len(imdb['test'])} test reviews "
           f"(first {cfg.max_len} tokens)")
    progress.record({"step": step, "test_accuracy": test_accuracy})
    save(test_accuracy)
    return ckpt_path, test_accuracy


def main():
    cfg = parse_config(RewardConfig, description="Train the IMDb sentiment classifier used as ground-truth reward.")
    imdb = load_imdb(cfg.data, verify=cfg.data_verify)
    path, acc = train_reward(cfg, imdb)
    print0(f"checkpoint: {path} (test accuracy {acc:.3f})")


if __name__ == "__main__":
    run_main(main)
