"""
Preference optimization on the policy's own samples: the seeds' answer to "DPO is offline, it cannot
explore". Both methods sample from the policy as it trains and label the samples with a reward r
(train.py: the ground truth by default, RLHF's learned reward model with --online-reward learned).

  online DPO  (Guo et al. 2024) every step: two completions of each of a batch of prompts from the
              current policy, the one of higher r chosen, and one DPO step (Eq. 7) against the fixed
              SFT reference. It is dpo.py's trainer, with online_pairs in place of the offline pairs.
  SPPO        (Wu et al. 2024) self-play, in iterations. In iteration t: K completions of each prompt
              from pi_t; the win rate of each against pi_t, P(y > pi_t | x), estimated from the other
              K - 1 with the Bradley-Terry preference sigma(r(y) - r(y')); then pi_{t+1} is pi_t
              trained on the regression dpo.sppo_loss:
                  (log(pi(y|x) / pi_t(y|x)) - eta * (P(y > pi_t | x) - 1/2))^2
              pi_{t+1} ~ pi_t exp(eta P) is the exponential-weights (multiplicative weights) step of
              the two-player game whose equilibrium is the policy no other policy is preferred to.

Both continue after a kill: each step's samples are a pure function of (seed, step) and the weights.
"""
import os
from dataclasses import dataclass, field

import torch

from checkpoint import load_model, resume, save_checkpoint, training_checkpoint
from cli import UserError, check
from device import autocast, setup_device
from dpo import PreferencePair, make_optimizer, sppo_loss
from logprobs import completion_token_logps, prompt_completion_rows
from optim import apply_gradients, linear_warmup, step_prompts, step_seed
from progress import Progress
from reward import reward_function
from sample import generate

# a checkpoint continues only the run these settings define
RESUME_FIELDS = ("sft", "reward", "iterations", "prompts_per_iteration", "samples_per_prompt", "eta", "batch_size",
                 "optimizer", "lr", "warmup_steps", "max_new_tokens", "seed")


# ---------------------------------------------------------------------------- the policy's own samples
@torch.no_grad()
def own_samples(policy, prompts, n, k, reward_fn, max_new_tokens, seed, step, batch_size=None):
    """k completions, from the policy as it is now, of each of n prompts drawn by (seed, step), and
    their rewards. Returns (the drawn prompts each repeated k times, the completions, the rewards as
    float64 numpy), all n * k long: a pure function of (seed, step) and the weights."""
    device = next(policy.parameters()).device
    repeated = [p for p in step_prompts(prompts, n, seed, step) for _ in range(k)]
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, step, 0))
    completions = generate(policy, repeated, max_new_tokens, stop_at_eot=False, generator=generator, batch_size=batch_size)
    return repeated, completions, reward_fn([p + c for p, c in zip(repeated, completions)])


# ---------------------------------------------------------------------------- online DPO
def online_pairs(step, policy, prompts, reward_fn, batch_size, max_new_tokens, seed):
    """Online DPO's batch for one step: batch_size prompts, two completions of each from the policy as
    it is now, the one of higher reward r chosen. Two identical completions make a pair with no
    gradient (log pi(y_w|x) - log pi(y_l|x) is 0 whatever the weights)."""
    twice, completions, rewards = own_samples(policy, prompts, batch_size, 2, reward_fn, max_new_tokens, seed, step)
    pairs = []
    for i in range(0, len(twice), 2):
        first, second = completions[i], completions[i + 1]
        chosen, rejected = (first, second) if rewards[i] >= rewards[i + 1] else (second, first)
        pairs.append(PreferencePair(twice[i], chosen, rejected))
    return pairs


# ---------------------------------------------------------------------------- SPPO
def win_rates(rewards):
    """P(y_i > pi_t | x) for the K samples of each prompt, rewards (N, K) -> (N, K): the mean
    Bradley-Terry preference over the prompt's other K - 1 samples,
        P_i = 1/(K - 1) * sum_{j != i} sigma(r_i - r_j)."""
    k = rewards.shape[1]
    preference = torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # (N, K, K): P(y_i > y_j)
    return (preference.sum(-1) - 0.5) / (k - 1)  # less the diagonal, sigma(0) = 1/2


@dataclass
class SPPOConfig:
    sft: str = field(default="out/sft.pt", metadata={"help": "SFT checkpoint: pi_0"})
    reward: str = field(default="out/reward.pt", metadata={"help": "classifier checkpoint whose logit is r in sigma(r(y) - r(y'))"})
    out: str = field(default="out/sppo", metadata={"help": "run folder for checkpoint and log"})
    name: str = field(default="sppo", metadata={"help": "checkpoint is OUT/NAME.pt, log OUT/NAME_log.jsonl"})
    iterations: int = field(default=3, metadata={"help": "self-play iterations t (SPPO: 3)"})
    prompts_per_iteration: int = field(default=6400, metadata={"help": "prompts sampled in each iteration"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K completions of each prompt from pi_t"})
    eta: float = field(default=10.0, metadata={"help": "step size eta of the exponential-weights update"})
    batch_size: int = field(default=128, metadata={"help": "completions per optimizer step"})
    optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop | adamw"})
    lr: float = field(default=1e-6, metadata={"help": "learning rate"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant"})
    grad_clip: float = field(default=10.0, metadata={"help": "clip the gradient norm (0 = off)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per sampled completion"})
    log_interval: int = field(default=10, metadata={"help": "steps between progress lines"})
    eval_interval: int = field(default=1, metadata={"help": "iterations between evaluations"})
    seed: int = field(default=0, metadata={"help": "random seed (prompts, samples, minibatches)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self):
        for name in ("iterations", "prompts_per_iteration", "batch_size", "max_new_tokens", "log_interval", "eval_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.samples_per_prompt >= 2, f"--samples-per-prompt must be at least 2 (a win rate needs another sample), "
                                            f"got {self.samples_per_prompt}")
        check((self.prompts_per_iteration * self.samples_per_prompt) % self.batch_size == 0,
              f"an iteration's {self.prompts_per_iteration} x {self.samples_per_prompt} completions must split into "
              f"batches of --batch-size {self.batch_size}")
        check(self.eta > 0, f"--eta must be > 0, got {self.eta}")
        check(self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0, "--lr must be > 0, --warmup-steps and --grad-clip >= 0")
        check(self.optimizer in ("rmsprop", "adamw"), f"--optimizer must be rmsprop or adamw, got {self.optimizer!r}")


@torch.no_grad()
def self_play_samples(policy, prompts, reward_fn, cfg, iteration):
    """Iteration t's data: K completions of each of its prompts from pi_t (the policy now), as left-padded
    rows, with log pi_t(y|x) and the win rates P(y > pi_t | x), one per row."""
    device = next(policy.parameters()).device
    n, k, length = cfg.prompts_per_iteration, cfg.samples_per_prompt, cfg.max_new_tokens
    repeated, completions, rewards = own_samples(policy, prompts, n, k, reward_fn, length, cfg.seed, iteration, batch_size=256)
    ids, mask, _ = prompt_completion_rows(repeated, completions, device)  # every completion is the last `length` tokens
    logps = []
    for rows in torch.arange(len(ids), device=device).split(cfg.batch_size):  # bounded (rows, T, V) logits
        with autocast(device.type):
            logps.append(completion_token_logps(policy, ids[rows], mask[rows], length).sum(-1))
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    return {"ids": ids, "mask": mask, "reference_logps": torch.cat(logps),
            "win_rates": win_rates(rewards.reshape(n, k)).flatten().to(device), "r": rewards.mean().item()}


def train_sppo(cfg, prompts, evaluate=None):
    """SPPO from the SFT checkpoint on these prompts. evaluate(step, policy) -> dict is called at step 0
    and after every eval_interval iterations. A checkpoint is written after each iteration, so a killed
    run redoes at most the iteration it was in, and ends on the weights an uninterrupted one would."""
    device = setup_device(cfg.device)
    policy = load_model(cfg.sft).to(device)
    if max(len(p) for p in prompts) + cfg.max_new_tokens > policy.config.block_size:
        raise UserError(f"the longest prompt plus --max-new-tokens {cfg.max_new_tokens} exceeds the model's context of {policy.config.block_size}")
    reward_fn = reward_function(cfg.reward, device, logit=True)
    policy.train()  # dropout is 0: sampling and training see the same log-probs
    optimizer = make_optimizer(policy, cfg.optimizer, cfg.lr, 0.0, device)
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    step, _ = resume(ckpt_path, "sppo", cfg, RESUME_FIELDS, policy, optimizer)
    steps_per_iteration = cfg.prompts_per_iteration * cfg.samples_per_prompt // cfg.batch_size
    total = cfg.iterations * steps_per_iteration
    progress = Progress(cfg.name, total, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="samples", start_step=step)
    if evaluate and step == 0:
        progress.record({"step": 0, **evaluate(0, policy)})
    while step < total:
        iteration = step // steps_per_iteration  # a checkpoint is only written between iterations
        data = self_play_samples(policy, prompts, reward_fn, cfg, iteration)  # from pi_t, frozen for the iteration
        order = torch.randperm(len(data["ids"]), generator=torch.Generator().manual_seed(step_seed(cfg.seed, iteration, 1)))
        for rows in order.to(device).split(cfg.batch_size):
            with autocast(device):
                logps = completion_token_logps(policy, data["ids"][rows], data["mask"][rows], cfg.max_new_tokens).sum(-1)  # log pi(y|x)
            loss = sppo_loss(logps, data["reference_logps"][rows], data["win_rates"][rows], cfg.eta).mean()
            loss.backward()
            lr = linear_warmup(cfg.lr, step, cfg.warmup_steps)
            log_ratio = (logps.detach() - data["reference_logps"][rows]).mean().item()
            metrics = apply_gradients(policy, optimizer, {"loss": loss.item(), "log_ratio": log_ratio}, lr, cfg.grad_clip, step)
            step += 1
            progress.add(cfg.batch_size)
            if step % cfg.log_interval == 0 or step % steps_per_iteration == 0:
                progress.line(step, {**metrics, "iteration": iteration + 1, "samples_r": data["r"], "lr": lr},
                              show=("iteration", "loss", "log_ratio", "samples_r", "grad_norm"))
        if evaluate and ((iteration + 1) % cfg.eval_interval == 0 or step == total):
            progress.record({"step": step, **evaluate(step, policy)})
            policy.train()
        save_checkpoint(ckpt_path, training_checkpoint("sppo", policy, optimizer, cfg, RESUME_FIELDS, step))
    return ckpt_path
