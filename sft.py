"""
Supervised fine-tuning: next-token prediction on IMDb review text (train + unsup splits; the test
split is held out for validation and, later, evaluation prompts). From scratch or from GPT-2.

    python sft.py                      # preset by device: cpu (minutes on 2 cores) or gpu -> out/sft.pt
    python sft.py --init gpt2 --preset gpu
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import load_model, resume, save_checkpoint, training_checkpoint
from cli import UserError, check, parse_config, run_main
from data import load_imdb
from device import autocast, check_divisible, check_model_fits, data_parallel, local_slice, peak_flops, print0, setup_device
from model import GPT, GPTConfig
from optim import add_metrics, adamw, apply_gradients, seed_everything, warmup_cosine
from progress import Progress

# a checkpoint continues only the run these settings define
RESUME_FIELDS = ("init", "n_layer", "n_head", "n_embd", "block_size", "output_vocab", "seed", "batch_size", "grad_accum", "steps", "lr")


@dataclass
class SFTConfig:
    out: str = field(default="out", metadata={"help": "run folder for the checkpoint and log (OUT/NAME.pt: out/sft.pt, where train.py writes it)"})
    name: str = field(default="sft", metadata={"help": "checkpoint is OUT/NAME.pt, log OUT/NAME_log.jsonl"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder (else $IMDB_ARCHIVE, data/, download)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive"})
    init: str = field(default="scratch", metadata={"help": "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a save_pretrained folder | a .safetensors or .pt path"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks (scratch only)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (scratch only)"})
    n_embd: int = field(default=128, metadata={"help": "model width (scratch only)"})
    block_size: int = field(default=128, metadata={"help": "training sequence length"})
    output_vocab: int = field(default=0, metadata={"help": "the LM head scores only the K most frequent tokens of the "
                              "training text, K = this (scratch only; 0: all 50,257, as GPT-2). The others are never emitted"})
    dropout: float = field(default=0.0, metadata={"help": "dropout during SFT"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    min_lr: float = field(default=2e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 = off)"})
    log_interval: int = field(default=20, metadata={"help": "steps between progress lines"})
    eval_interval: int = field(default=200, metadata={"help": "steps between validation losses"})
    eval_batches: int = field(default=8, metadata={"help": "micro-batches per validation loss"})
    save_interval: int = field(default=200, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=1337, metadata={"help": "random seed (data order and init)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the model on CUDA"})

    def validate(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "steps",
                     "log_interval", "eval_interval", "eval_batches", "save_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        if self.init == "scratch":
            check_model_fits(self.n_layer, self.n_embd, self.block_size)
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= --min-lr <= --lr and --lr > 0, got {self.min_lr}, {self.lr}")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        check(self.warmup_steps >= 0 and self.grad_clip >= 0, "--warmup-steps and --grad-clip must be >= 0")
        check(0 <= self.output_vocab <= GPTConfig.vocab_size,
              f"--output-vocab must be in [0, {GPTConfig.vocab_size}] (0: the full head), got {self.output_vocab}")
        check(self.init == "scratch" or not self.output_vocab,
              f"--output-vocab {self.output_vocab} restricts a model trained from scratch; --init {self.init} keeps GPT-2's full head: pass --output-vocab 0")


PRESETS = {
    "smoke": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, output_vocab=512, batch_size=8, steps=30, warmup_steps=5,
                  log_interval=10, eval_interval=30, eval_batches=2, save_interval=30),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, output_vocab=8192, batch_size=16, steps=600, lr=2e-3),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=64, grad_accum=2, steps=1500,
                lr=6e-4, min_lr=6e-5, warmup_steps=100, log_interval=50, eval_interval=500, eval_batches=20,
                save_interval=500),
}


def most_frequent_tokens(tokens, k):
    """The k most frequent ids of a token stream (ties: the lower id), sorted: a restricted head's output_ids."""
    counts = np.bincount(tokens, minlength=GPTConfig.vocab_size)
    return torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:k]))


def build_model(cfg, device, train_tokens=None):
    """A fresh GPT (with --output-vocab, its head scoring train_tokens' most frequent tokens), published
    GPT-2 weights, or the model of one of our checkpoints."""
    if cfg.init == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              dropout=cfg.dropout, output_vocab=cfg.output_vocab))
        if cfg.output_vocab:
            model.output_ids.copy_(most_frequent_tokens(train_tokens, cfg.output_vocab))
        return model.to(device)
    return load_model(cfg.init, dropout=cfg.dropout).to(device)  # our checkpoint, or GPT-2 weights (checked)


def random_windows(tokens, n, length, seed):
    """n windows of `length` + 1 tokens at random offsets of a token stream. (n, length + 1)"""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length, size=n)  # the last window ends on the last token
    return torch.from_numpy(np.stack([tokens[s:s + length + 1].astype(np.int64) for s in starts]))


def lm_loss(model, windows, forward=None):
    """Mean next-token cross-entropy over a batch of windows (B, T + 1). With a restricted head
    (--output-vocab), over the next tokens it scores: the others (rows -1) are left out.
    forward is the module to call (compiled or DDP-wrapped); model owns the weights."""
    logits = (forward if forward is not None else model)(windows[:, :-1])  # (B, T, V)
    targets = model.output_rows(windows[:, 1:])
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


@torch.no_grad()
def validation_loss(model, tokens, cfg, device):
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        batch = random_windows(tokens, cfg.batch_size, cfg.block_size, seed=[cfg.seed, 10**9, i]).to(device)
        with autocast(device):
            losses.append(float(lm_loss(model, batch)))
    model.train()
    return sum(losses) / len(losses)


def sft_step(model, optimizer, micro_batches, lr, grad_clip, step, forward=None):
    """One optimizer step of next-token training over gradient-accumulated micro-batches of windows.
    forward is the module to call (compiled or DDP-wrapped); model owns the weights."""
    forward = forward if forward is not None else model  # not `or`: a compiled or DDP module has no truth value
    metrics = {}
    for windows in micro_batches:
        with autocast(windows.device.type):
            loss = lm_loss(model, windows, forward)
        (loss / len(micro_batches)).backward()  # the step's gradient is the mean over its micro-batches
        add_metrics(metrics, {"loss": loss}, len(micro_batches))
    return apply_gradients(model, optimizer, metrics, lr, grad_clip, step)


def train_lm(cfg, train_tokens, val_tokens):
    """Next-token training on a uint16 token stream; resumes from OUT/NAME.pt if it exists.
    Returns the checkpoint path."""
    device = setup_device(cfg.device)
    check_divisible(cfg.batch_size, "--batch-size")
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    for stream, what in ((train_tokens, "training"), (val_tokens, "validation")):
        if len(stream) <= cfg.block_size + 1:
            raise UserError(f"the {what} text holds {len(stream)} tokens, fewer than one window of {cfg.block_size + 1}")
    seed_everything(cfg.seed)
    model = build_model(cfg, device, train_tokens)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"--block-size {cfg.block_size} exceeds the model's context of {model.config.block_size}")
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.95), device)
    step, _ = resume(ckpt_path, "sft", cfg, RESUME_FIELDS, model, optimizer)
    if step >= cfg.steps:
        return ckpt_path
    print0(f"{cfg.name}: {model.num_params() / 1e6:.1f}M parameters, {len(train_tokens):,} training tokens, device {device}")
    model.train()
    forward = torch.compile(model) if cfg.compile and device.startswith("cuda") else model
    forward = data_parallel(forward, device)  # under torchrun; the model itself otherwise
    peak = peak_flops(device)
    flops_per_token = model.flops_per_token(cfg.block_size)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    progress = Progress(cfg.name, cfg.steps, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), start_step=step)

    while step < cfg.steps:
        micro_batches = [local_slice(random_windows(train_tokens, cfg.batch_size, cfg.block_size, seed=[cfg.seed, step, m])).to(device)
                         for m in range(cfg.grad_accum)]  # each rank takes its share of the global batch
        lr = warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
        metrics = sft_step(model, optimizer, micro_batches, lr, cfg.grad_clip, step, forward)
        step += 1
        progress.add(tokens_per_step)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            shown = {"loss": metrics["loss"], "lr": lr, "grad_norm": metrics["grad_norm"]}
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                shown["val_loss"] = validation_loss(model, val_tokens, cfg, device)
            progress.line(step, shown, peak_flops=peak, flops_per_unit=flops_per_token)
        if step % cfg.save_interval == 0 or step == cfg.steps:
            save_checkpoint(ckpt_path, training_checkpoint("sft", model, optimizer, cfg, RESUME_FIELDS, step))
    return ckpt_path


def main():
    presets_default = "gpu" if torch.cuda.is_available() else "cpu"
    cfg = parse_config(SFTConfig, presets=PRESETS, default_preset=presets_default,
                       description="Supervised fine-tuning on IMDb reviews.")
    imdb = load_imdb(cfg.data, verify=cfg.data_verify)
    train_tokens = np.concatenate([imdb["train"].tokens, imdb["unsup"].tokens])
    path = train_lm(cfg, train_tokens, imdb["test"].tokens)
    print0(f"checkpoint: {path}\ntry: python sample.py --ckpt {path} --prompt \"This movie\" --n 4")


if __name__ == "__main__":
    run_main(main)
