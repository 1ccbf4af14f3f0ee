"""
PPO for language models: the RLHF step DPO replaces (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), from scratch, to be read beside dpo.py.

Both maximise the same KL-constrained reward (Eq. 3 of the DPO paper):
    max_pi  E_{x, y ~ pi(y|x)}[r(x, y)] - beta * KL(pi(y|x) || pi_ref(y|x)).
DPO solves it in closed form (Eq. 4) and fits the solution to preference pairs. PPO climbs it by
reinforcement learning on samples of the policy itself, with r a Bradley-Terry reward model
learned from the pairs (bradley_terry.py), or for PPO-GT the ground truth. One step:

  1. rollout    one completion y of each of a batch of prompts x, sampled from pi (the KV-cache sampler)
  2. score      r(x, y), normalised by the mean and std of r over samples of the initial policy
  3. reward     per token: r_t = -beta_KL * (log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)), plus r(x, y)
                at the last token. Summed over t: r(x, y) - beta_KL log(pi(y|x) / pi_ref(y|x)), whose
                expectation under pi is Eq. 3
  4. advantage  GAE (Schulman et al. 2016) with a critic V(x, y_<t), whitened over the batch
  5. update     epochs of minibatches of the clipped surrogate (Schulman et al. 2017) and a value loss
  6. beta_KL    moves toward the value that holds the measured KL at a target (Ziegler et al. 2019),
                or stays fixed (target_kl 0)

    python ppo.py                            # after python train.py: out/sft.pt, out/rm.pt -> out/ppo/ppo.pt
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from checkpoint import load_model, resume, save_checkpoint, training_checkpoint
from cli import UserError, check, parse_config, run_main
from data import load_imdb, make_prefixes
from device import autocast, print0, setup_device
from logprobs import completion_token_logps, prompt_completion_rows
from model import GPT
from optim import adamw, check_finite, linear_warmup, mean_over_ranks, set_lr, step_prompts, step_seed
from progress import Progress
from reward import reward_function
from sample import generate

# Rows per no-grad pass of a rollout (the policy's and reference's log-probs, the critic's values), by
# device: on a GPU few large passes, bounded by their (rows, T, V) logits (256 x 49 x 50,257 in bf16 is
# 1.3 GB); on a CPU small ones, whose temporaries stay in its caches.
ROLLOUT_ROWS = {"cuda": 256, "cpu": 16}

# a checkpoint continues only the run these settings define
RESUME_FIELDS = ("sft", "reward", "n_prefixes", "max_new_tokens", "batch_size", "minibatch_size", "epochs", "lr",
                 "critic_lr", "warmup_steps", "init_kl_coef", "target_kl", "kl_rate", "gamma", "lam", "clip",
                 "value_clip", "seed")


# ---------------------------------------------------------------------------- the math
def kl_penalized_rewards(scores, policy_logps, reference_logps, kl_coef):
    """Per-token rewards (B, L) of completions of L tokens: -kl_coef * (log pi(y_t|.) - log pi_ref(y_t|.))
    at each token, plus the sequence score r(x, y) (B,) at the last one."""
    rewards = -kl_coef * (policy_logps - reference_logps)  # the KL penalty, token by token
    rewards[:, -1] += scores  # r(x, y) arrives when the completion is done
    return rewards


def gae(rewards, values, gamma, lam):
    """Generalised advantage estimation over completions of L tokens that end after the last one
    (no value beyond it). rewards, values (B, L), values[:, t] = V(x, y_<t). Returns advantages and
    value targets (B, L):
        delta_t = r_t + gamma * V_{t+1} - V_t           (V_L = 0)
        A_t     = delta_t + gamma * lam * A_{t+1}     = sum_k (gamma lam)^k delta_{t+k}
        R_t     = A_t + V_t"""
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


def whiten(x):
    """(x - mean) / std over every element: the advantages of a batch on one scale."""
    return (x - x.mean()) / (x.std() + 1e-8)


def ppo_policy_loss(logps, old_logps, advantages, clip):
    """The clipped surrogate (Schulman et al. 2017, Eq. 7) as a loss, per token (B, L):
        ratio = pi(y_t|.) / pi_old(y_t|.)
        L = -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)
    Once the ratio has left [1 - clip, 1 + clip] in the direction A favours, the gradient is zero."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


def ppo_value_loss(values, old_values, returns, clip):
    """The critic's loss per token (B, L), clipped like the policy's:
        L = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2)"""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def adapt_kl_coef(kl_coef, kl, target, rate):
    """The adaptive KL controller (Ziegler et al. 2019, Sec. 2.2):
        e = clip(KL / target - 1, -0.2, 0.2),  beta_KL <- beta_KL * (1 + rate * e)
    Too much KL raises the penalty, too little lowers it. target 0: beta_KL stays fixed."""
    if target == 0:
        return kl_coef
    return kl_coef * (1 + rate * min(max(kl / target - 1, -0.2), 0.2))


# ---------------------------------------------------------------------------- the critic
class Critic(nn.Module):
    """V(x, y_<t): the SFT model's trunk with a scalar head, a value at every position (B, T). The
    token embedding is not trained: it is most of a small model's weights (6.4M of 7.2M in the CPU
    preset), and its Adam update would cost more than the rest of the step."""

    def __init__(self, config):
        super().__init__()
        self.gpt = GPT(config)  # only the trunk is used; the tied LM head adds no parameters
        self.gpt.transformer.wte.requires_grad_(False)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask):
        return self.head(self.gpt.hidden_states(idx, attention_mask)).squeeze(-1)


def response_values(critic, ids, mask, length):
    """V(x, y_<t) for the last `length` tokens: the value at the position that predicts each one, (B, length)."""
    return critic(ids, mask)[:, -length - 1:-1].float()


# ---------------------------------------------------------------------------- the trainer
@dataclass
class PPOConfig:
    sft: str = field(default="out/sft.pt", metadata={"help": "SFT checkpoint: initial policy, reference and critic trunk"})
    reward: str = field(default="out/rm.pt", metadata={"help": "reward checkpoint: a Bradley-Terry model (PPO) or the ground truth (PPO-GT)"})
    out: str = field(default="out/ppo", metadata={"help": "run folder for checkpoint and log"})
    name: str = field(default="ppo", metadata={"help": "checkpoint is OUT/NAME.pt, log OUT/NAME_log.jsonl"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder, for the prompts (python ppo.py only)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive (python ppo.py only)"})
    n_prefixes: int = field(default=25_000, metadata={"help": "train-review prefixes to roll out from (python ppo.py only)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per sampled completion"})
    steps: int = field(default=100, metadata={"help": "PPO steps (a rollout batch and its updates each)"})
    batch_size: int = field(default=256, metadata={"help": "rollouts per step (the paper's authors mention 1,024)"})
    minibatch_size: int = field(default=64, metadata={"help": "rollouts per optimizer step"})
    epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    lr: float = field(default=1e-5, metadata={"help": "policy learning rate (Adam)"})
    critic_lr: float = field(default=1e-4, metadata={"help": "critic learning rate (Adam)"})
    warmup_steps: int = field(default=5, metadata={"help": "PPO steps of linear learning-rate warm-up"})
    init_kl_coef: float = field(default=0.1, metadata={"help": "beta_KL at the start"})
    target_kl: float = field(default=6.0, metadata={"help": "sequence KL the controller aims at (paper: 3, 6, 9, 12; 0 = fixed beta_KL)"})
    kl_rate: float = field(default=0.1, metadata={"help": "controller gain K_beta"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "surrogate clip range"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip range"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip each model's gradient norm (0 = off)"})
    norm_samples: int = field(default=256, metadata={"help": "samples of the initial policy that set the reward's mean and std"})
    eval_interval: int = field(default=10, metadata={"help": "steps between evaluations", "train_py": True})
    save_interval: int = field(default=10, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (prompts, samples, minibatches)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self):
        for name in ("n_prefixes", "max_new_tokens", "steps", "batch_size", "minibatch_size", "epochs", "norm_samples",
                     "eval_interval", "save_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.batch_size % self.minibatch_size == 0,
              f"--batch-size {self.batch_size} must be a multiple of --minibatch-size {self.minibatch_size}")
        check(self.lr > 0 and self.critic_lr > 0 and self.init_kl_coef >= 0, "--lr, --critic-lr must be > 0, --init-kl-coef >= 0")
        check(self.target_kl >= 0 and self.kl_rate >= 0 and self.warmup_steps >= 0 and self.grad_clip >= 0,
              "--target-kl, --kl-rate, --warmup-steps and --grad-clip must be >= 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "--gamma and --lam must be in [0, 1]")
        check(self.clip > 0 and self.value_clip > 0, "--clip and --value-clip must be > 0")


@torch.no_grad()
def reward_scale(policy, prompts, reward_fn, cfg):
    """Step 2's scale, measured once before training: the mean and std of r over cfg.norm_samples
    samples of the initial policy (the SFT model), so that its rewards have mean 0 and std 1."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, 0, 2))
    norm_prompts = [prompts[i % len(prompts)] for i in range(cfg.norm_samples)]
    completions = generate(policy, norm_prompts, cfg.max_new_tokens, stop_at_eot=False, generator=generator, batch_size=256)
    raw = reward_fn([p + c for p, c in zip(norm_prompts, completions)])
    return float(raw.mean()), float(raw.std()) + 1e-8


def normalised_scores(prompts, completions, reward_fn, normalise, device):
    """Step 2: r(x, y) of each sample, and the same on the initial policy's scale, (r - mean) / std: (B,) each."""
    raw = torch.as_tensor(reward_fn([p + c for p, c in zip(prompts, completions)]), dtype=torch.float32, device=device)
    return raw, (raw - normalise[0]) / normalise[1]


@torch.no_grad()
def rollout(policy, reference, critic, prompts, reward_fn, normalise, kl_coef, cfg, step):
    """Steps 1-4 on one batch of prompts: the samples and what the update needs, all (B, L) but ids and mask."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 0))
    completions = generate(policy, prompts, cfg.max_new_tokens, stop_at_eot=False, generator=generator)
    ids, mask, _ = prompt_completion_rows(prompts, completions, device)  # every completion is the last L tokens
    L, parts, chunk = cfg.max_new_tokens, [], ROLLOUT_ROWS[device.type]
    for i in range(0, len(prompts), chunk):
        rows = slice(i, i + chunk)
        with autocast(device.type):
            parts.append((completion_token_logps(policy, ids[rows], mask[rows], L),
                          completion_token_logps(reference, ids[rows], mask[rows], L),
                          response_values(critic, ids[rows], mask[rows], L)))
    logps, reference_logps, values = (torch.cat(p) for p in zip(*parts))
    raw_scores, scores = normalised_scores(prompts, completions, reward_fn, normalise, device)  # step 2
    rewards = kl_penalized_rewards(scores, logps, reference_logps, kl_coef)  # step 3
    advantages, returns = gae(rewards, values, cfg.gamma, cfg.lam)  # step 4
    kl = (logps - reference_logps).sum(-1)  # log pi(y|x) / pi_ref(y|x): an unbiased sample of the sequence KL
    batch = {"ids": ids, "mask": mask, "logps": logps, "values": values, "advantages": whiten(advantages), "returns": returns}
    return batch, {"score": raw_scores.mean().item(), "kl": kl.mean().item(), "kl_coef": kl_coef}


def update(policy, critic, optimizers, batch, cfg, lr, critic_lr, step):
    """Step 5: epochs of minibatches of the clipped surrogate (policy) and the clipped value loss (critic)."""
    policy_optimizer, critic_optimizer = optimizers
    policy_params, critic_params = ([p for p in m.parameters() if p.requires_grad] for m in (policy, critic))
    set_lr(policy_optimizer, lr)
    set_lr(critic_optimizer, critic_lr)
    L, totals, n = cfg.max_new_tokens, {}, 0
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1))
    for _ in range(cfg.epochs):
        for rows in torch.randperm(len(batch["ids"]), generator=generator).split(cfg.minibatch_size):
            rows = rows.to(batch["ids"].device)
            ids, mask = batch["ids"][rows], batch["mask"][rows]
            with autocast(ids.device.type):
                logps = completion_token_logps(policy, ids, mask, L)  # (b, L)
                values = response_values(critic, ids, mask, L)
            policy_loss = ppo_policy_loss(logps, batch["logps"][rows], batch["advantages"][rows], cfg.clip).mean()
            value_loss = ppo_value_loss(values, batch["values"][rows], batch["returns"][rows], cfg.value_clip).mean()
            (policy_loss + value_loss).backward()  # separate weights: each loss reaches only its own model
            grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, cfg.grad_clip or float("inf"))
            check_finite(policy_loss.detach(), grad_norm, step, policy_optimizer)
            policy_optimizer.step()
            policy_optimizer.zero_grad(set_to_none=True)
            value_grad_norm = torch.nn.utils.clip_grad_norm_(critic_params, cfg.grad_clip or float("inf"))
            check_finite(value_loss.detach(), value_grad_norm, step, critic_optimizer)
            critic_optimizer.step()
            critic_optimizer.zero_grad(set_to_none=True)
            ratio = torch.exp(logps.detach() - batch["logps"][rows])
            # detached tensors, not .item(): the host reads them once, after the last minibatch
            metrics = {"loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                       "clip_frac": ((ratio - 1).abs() > cfg.clip).float().mean(),
                       "approx_kl": (batch["logps"][rows] - logps.detach()).mean(),  # KL(pi_old || pi) per token
                       "grad_norm": grad_norm, "value_grad_norm": value_grad_norm}
            totals = {k: totals.get(k, 0.0) + v for k, v in metrics.items()}
            n += 1
    return mean_over_ranks({k: float(v) / n for k, v in totals.items()})


def train_ppo(cfg, prompts, evaluate=None):
    """PPO from the SFT checkpoint on these prompts. evaluate(step, policy) -> dict is called at step
    0, every eval_interval steps and at the end. Resumes from OUT/NAME.pt."""
    device = setup_device(cfg.device)
    policy = load_model(cfg.sft).to(device)
    if max(len(p) for p in prompts) + cfg.max_new_tokens > policy.config.block_size:
        raise UserError(f"the longest prompt plus --max-new-tokens {cfg.max_new_tokens} exceeds the model's context of {policy.config.block_size}")
    reference = load_model(cfg.sft).to(device).eval().requires_grad_(False)
    critic = Critic(policy.config)
    critic.gpt.load_state_dict(reference.state_dict())
    critic.to(device)
    reward_fn = reward_function(cfg.reward, device)
    policy.train(), critic.train()  # dropout is 0: rollout and update see the same log-probs
    optimizers = (adamw(policy, cfg.lr, 0.0, (0.9, 0.95), device), adamw(critic, cfg.critic_lr, 0.0, (0.9, 0.95), device))
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    step, ckpt = resume(ckpt_path, "ppo", cfg, RESUME_FIELDS, policy, optimizers[0])
    if ckpt is not None:
        parts = ("critic", "critic_optimizer", "kl_coef", "normalise")
        if any(k not in ckpt for k in parts) or not (math.isfinite(ckpt["kl_coef"]) and all(map(math.isfinite, ckpt["normalise"]))):
            raise UserError(f"{ckpt_path} lacks a finite {', '.join(parts)}: it is not a PPO checkpoint this project wrote "
                            f"whole; delete it to start the run again")
        critic.load_state_dict(ckpt["critic"])
        optimizers[1].load_state_dict(ckpt["critic_optimizer"])
        kl_coef, normalise = ckpt["kl_coef"], ckpt["normalise"]
    else:
        kl_coef, normalise = cfg.init_kl_coef, reward_scale(policy, prompts, reward_fn, cfg)
        print0(f"{cfg.name}: reward over {cfg.norm_samples} samples of the initial policy: mean {normalise[0]:.4f}, std {normalise[1]:.4f}")
    progress = Progress(cfg.name, cfg.steps, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="samples", start_step=step)
    if evaluate and step == 0:
        progress.record({"step": 0, **evaluate(0, policy)})
    while step < cfg.steps:
        batch_prompts = step_prompts(prompts, cfg.batch_size, cfg.seed, step)
        policy.eval()
        batch, rollout_metrics = rollout(policy, reference, critic, batch_prompts, reward_fn, normalise, kl_coef, cfg, step)
        policy.train()
        lr, critic_lr = linear_warmup(cfg.lr, step, cfg.warmup_steps), linear_warmup(cfg.critic_lr, step, cfg.warmup_steps)
        metrics = update(policy, critic, optimizers, batch, cfg, lr, critic_lr, step)
        kl_coef = adapt_kl_coef(kl_coef, rollout_metrics["kl"], cfg.target_kl, cfg.kl_rate)  # step 6
        step += 1
        progress.add(cfg.batch_size)
        progress.line(step, {**rollout_metrics, **metrics, "lr": lr},
                      show=("score", "kl", "kl_coef", "loss", "value_loss", "clip_frac"))
        if evaluate and (step % cfg.eval_interval == 0 or step == cfg.steps):
            progress.record({"step": step, **evaluate(step, policy)})
        if step % cfg.save_interval == 0 or step == cfg.steps:
            save_checkpoint(ckpt_path, training_checkpoint("ppo", policy, optimizers[0], cfg, RESUME_FIELDS, step,
                                                           critic=critic.state_dict(), critic_optimizer=optimizers[1].state_dict(),
                                                           kl_coef=kl_coef, normalise=list(normalise)))
    return ckpt_path


def main():
    cfg = parse_config(PPOConfig, description="PPO on IMDb train prefixes, from an SFT checkpoint, against a reward checkpoint.")
    imdb = load_imdb(cfg.data, verify=cfg.data_verify)
    try:
        prompts = make_prefixes(imdb["train"], cfg.n_prefixes, seed=cfg.seed)
    except ValueError as e:
        raise UserError(f"--n-prefixes {cfg.n_prefixes} is too many for the data: {e}") from None
    path = train_ppo(cfg, prompts)
    print0(f"checkpoint: {path}\ntry: python sample.py --ckpt {path} --prompt \"This movie\" --n 4")


if __name__ == "__main__":
    run_main(main)
