"""
Direct Preference Optimization (Rafailov et al. 2023), written so each step of the derivation is
one place in the code.

The RLHF objective (Eq. 3)       max_pi  E[r(x, y)] - beta * KL(pi(y|x) || pi_ref(y|x))
has the closed-form optimum (Eq. 4)  pi_r(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x).
Solved for the reward (Eq. 5)    r(x, y) = beta * log(pi_r(y|x) / pi_ref(y|x)) + beta * log Z(x).
Put into Bradley-Terry (Eq. 1)   p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)), Z(x) cancels (Eq. 6),
and maximum likelihood over preference pairs is the DPO loss (Eq. 7):
    L = -log sigma(beta * log(pi(y_w|x)/pi_ref(y_w|x)) - beta * log(pi(y_l|x)/pi_ref(y_l|x))).

    python dpo.py --pairs my_pairs.jsonl              # after python sft.py or train.py: out/sft.pt -> out/dpo/dpo.pt
    python dpo.py --sft gpt2 --pairs my_pairs.jsonl   # from GPT-2's weights (a published name or a save_pretrained folder)
"""
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from checkpoint import load_model, resume, save_checkpoint, training_checkpoint
from cli import UserError, check, parse_config, run_main
from data import EOT, get_encoding
from device import autocast, check_divisible, data_parallel, local_slice, print0, setup_device
from logprobs import response_token_logps, sequence_logps
from optim import add_metrics, adamw, apply_gradients, batch_indices, linear_warmup
from preferences import PreferencePair, read_pairs
from progress import Progress

# a checkpoint continues only the run these settings define
RESUME_FIELDS = ("sft", "pairs", "beta", "loss_type", "alpha", "gamma", "lam", "desirable_weight", "undesirable_weight",
                 "label_smoothing", "batch_size", "optimizer", "lr",
                 "warmup_steps", "max_length", "append_eot", "seed")


# ---------------------------------------------------------------------------- the math
def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair losses and the implicit rewards of chosen and rejected responses, each (B,)."""
    # Eq. 5: the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (+ beta log Z(x), which cancels below)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    # Eq. 6: the Bradley-Terry logit r(x, y_w) - r(x, y_l) = beta * d
    d = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        # Eq. 7: L = -log sigma(beta * d); with label_smoothing eps the labels are flipped with
        # probability eps (conservative DPO): L = -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)
        # Its gradient (Sec. 4), which autograd takes from this line:
        #   -beta * sigma(r(x, y_l) - r(x, y_w)) * (grad log pi(y_w|x) - grad log pi(y_l|x)),
        # so the pairs the implicit reward ranks wrongly weigh the most.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":  # IPO (Azar et al. 2023): regress d onto 1 / (2 beta)
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # SLiC-style hinge on the scaled margin
        losses = torch.relu(1 - beta * d)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use sigmoid, ipo or hinge")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def unlikelihood_loss(chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, alpha):
    """The paper's Unlikelihood baseline (Welleck et al. 2019) on preference pairs, per pair (B,):
        L = -mean_t log pi(y_w,t | x, y_w,<t) - alpha * mean_t log(1 - pi(y_l,t | x, y_l,<t))
    Token log-probs (B, T-1) as token_logps returns them; masks (B, T-1) mark each response's tokens.
    No reference model: only the likelihood term holds the policy to fluent text."""
    chosen_nll = -torch.where(chosen_mask, chosen_token_logps, 0.0).sum(-1) / chosen_mask.sum(-1)
    # log(1 - p) = log(-expm1(log p)): exact for small p; floored at 1e-6 as p -> 1 (no gradient there)
    log_one_minus_p = torch.log((-torch.expm1(rejected_token_logps)).clamp_min(1e-6))
    unlikelihood = -torch.where(rejected_mask, log_one_minus_p, 0.0).sum(-1) / rejected_mask.sum(-1)
    return chosen_nll + alpha * unlikelihood


def simpo_loss(chosen_avg_logps, rejected_avg_logps, beta, gamma):
    """SimPO (Meng et al. 2024), per pair (B,). The implicit reward is the length-normalised likelihood
    beta * (1/|y|) log pi(y|x), and gamma is a target reward margin the chosen reward must clear.
    Inputs (B,) are mean log-probs over each response's tokens: sequence_logps(..., average=True).
    No reference model. SimPO's defaults: beta 2.0, gamma 0.5 (the paper tunes both per model)."""
    # L = -log sigma(beta * (avg_w - avg_l) - gamma)
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def orpo_loss(chosen_avg_logps, rejected_avg_logps, lam):
    """ORPO (Hong et al. 2024), per pair (B,): the chosen response's NLL plus lam times a log odds ratio,
    with P(y|x) = exp(a) for a the mean log-prob over the response tokens (sequence_logps(..., average=True)):
        L = -a_w - lam * log sigma(log_odds(a_w) - log_odds(a_l)),  log_odds(a) = log(P / (1 - P)) = a - log(1 - e^a).
    The NLL term is the per-example mean over chosen tokens, a_w itself. No reference model: ORPO's claim
    is that it can start before SFT, from the base model; here it starts from the SFT model as the others do.
    log(1 - e^a) is log(-expm1(a)): accurate as a -> 0- in float32, where 1 - exp(a) is 0 for a > -3e-8.
    At a = 0 (every token certain) the odds are infinite, so a is clamped to at most -tiny (the dtype's
    smallest normal number; log_odds(-tiny) is ~87 in float32, ~708 in float64): the loss stays finite, and
    no gradient flows through the odds of an a above -tiny (the NLL term still has its gradient, -1)."""
    def log_odds(a):
        a = a.clamp_max(-torch.finfo(a.dtype).tiny)
        return a - torch.log(-torch.expm1(a))  # log(P / (1 - P)) = a - log(1 - e^a)

    # L = -a_w - lam * log sigma(log_odds(a_w) - log_odds(a_l))
    return -chosen_avg_logps - lam * F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


def kto_loss(policy_logps, reference_logps, desirable, kl, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024), per example (B,), on unpaired data: each completion is labelled
    desirable or undesirable on its own. r = log(pi(y|x) / pi_ref(y|x)) is measured against the reference
    point z = max(kl, 0), where kl (a scalar tensor, or one broadcastable to (B,)) is the batch estimate of
    KL(pi || pi_ref) from mismatched (prompt, completion) pairs, as in the KTO paper; it is detached here,
    so no gradient flows into it. Then
        desirable:    L = w_D * (1 - sigma(beta * (r - z)))
        undesirable:  L = w_U * (1 - sigma(beta * (z - r)))
    policy_logps, reference_logps (B,) are sequence log-probs log pi(y|x); desirable is a bool tensor (B,).
    On IMDb the preference pairs become unpaired data: chosen -> desirable, rejected -> undesirable."""
    rewards = policy_logps - reference_logps  # r = log(pi / pi_ref), (B,)
    z = kl.detach().clamp_min(0)  # z_0 = max(0, KL estimate), no gradient
    # 1 - sigma(x) is computed as sigma(-x): the same value, without cancellation when sigma(x) is near 1
    return torch.where(desirable,
                       desirable_weight * torch.sigmoid(beta * (z - rewards)),  # L_D = w_D * (1 - sigma(beta * (r - z)))
                       undesirable_weight * torch.sigmoid(beta * (rewards - z)))  # L_U = w_U * (1 - sigma(beta * (z - r)))


def sppo_loss(policy_logps, reference_logps, win_rates, eta):
    """SPPO (Wu et al. 2024), per completion (B,), in iteration t of self-play: the log-ratio to the
    last iterate pi_t is regressed onto the centred win rate P(y > pi_t | x) of the completion,
        L = (log(pi(y|x) / pi_t(y|x)) - eta * (P(y > pi_t | x) - 1/2))^2,
    whose minimiser is the exponential-weights step pi_{t+1}(y|x) ~ pi_t(y|x) exp(eta P(y > pi_t | x)),
    if the normaliser is taken as its estimate exp(eta / 2). policy_logps, reference_logps (B,) are
    log pi(y|x) and log pi_t(y|x); win_rates (B,) in [0, 1]. Unpaired: each completion on its own."""
    return (policy_logps - reference_logps - eta * (win_rates - 0.5)) ** 2


# ---------------------------------------------------------------------------- the losses by --loss-type
# Each takes the step's rows, [chosen; rejected] (B each): the policy's per-token log-probs and the
# response mask (2B, T-1), and the reference's log pi_ref(y|x) (2B,) (None for the losses without a
# reference). Each returns the per-example losses, log pi(y|x) of [chosen; rejected] (2B,), and the
# implicit rewards of [chosen; rejected] (2B,), or None for a loss that defines none.
def dpo_losses(cfg, token_logps, mask, reference_logps):
    """DPO (sigmoid, Eq. 7), IPO and the hinge loss: all three on the log-ratio margin d of dpo_loss."""
    logps = sequence_logps(token_logps, mask)  # log pi(y|x)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps.chunk(2), *reference_logps.chunk(2), cfg.beta,
                                                        cfg.label_smoothing, cfg.loss_type)
    return losses, logps, torch.cat([chosen_rewards, rejected_rewards])


def kto_losses(cfg, token_logps, mask, reference_logps):
    """KTO: the rows are [chosen; chosen after the next pair's prompt; rejected; rejected after the next
    pair's prompt] (kto_pairs), the mismatched ones only giving the batch's KL estimate."""
    (logps, mismatched), (reference_logps, reference_mismatched) = (
        rearrange(x, "(side group b) -> group (side b)", side=2, group=2) for x in (sequence_logps(token_logps, mask), reference_logps))
    kl = (mismatched - reference_mismatched).mean()  # the batch's KL(pi || pi_ref) estimate, z before max(., 0)
    desirable = torch.arange(len(logps), device=logps.device) < len(logps) // 2  # chosen -> desirable
    losses = kto_loss(logps, reference_logps, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    return losses, logps, cfg.beta * (logps - reference_logps).detach()


def simpo_losses(cfg, token_logps, mask, reference_logps):
    averages = sequence_logps(token_logps, mask, average=True)  # (1/|y|) log pi(y|x)
    return simpo_loss(*averages.chunk(2), cfg.beta, cfg.gamma), sequence_logps(token_logps, mask), cfg.beta * averages.detach()


def orpo_losses(cfg, token_logps, mask, reference_logps):
    averages = sequence_logps(token_logps, mask, average=True)  # (1/|y|) log pi(y|x)
    return orpo_loss(*averages.chunk(2), cfg.lam), sequence_logps(token_logps, mask), None


def unlikelihood_losses(cfg, token_logps, mask, reference_logps):
    return unlikelihood_loss(*token_logps.chunk(2), *mask.chunk(2), cfg.alpha), sequence_logps(token_logps, mask), None


@dataclass
class Loss:
    """One line of the family's table: the function on a step's rows (above), whether it needs pi_ref,
    and, for a loss that train.py runs as a method of its own on DPO's pairs, its name on the frontier
    and its settings (DPOConfig fields) with their values in the experiment. train.py makes each setting
    a flag, --<loss>-<setting> (--simpo-gamma), and the method's runs one folder for its values."""
    losses: Callable
    reference: bool = True
    method: str = ""
    settings: dict = field(default_factory=dict)


LOSSES = {
    "sigmoid": Loss(dpo_losses),  # DPO (Eq. 7): train.py's method dpo, one run per --betas
    "ipo": Loss(dpo_losses, method="IPO", settings={"beta": 0.1}),
    "hinge": Loss(dpo_losses),  # SLiC's hinge: dpo.py --loss-type hinge only
    "kto": Loss(kto_losses, method="KTO", settings={"beta": 0.1}),
    "simpo": Loss(simpo_losses, reference=False, method="SimPO", settings={"beta": 2.0, "gamma": 0.5}),  # SimPO's defaults
    "orpo": Loss(orpo_losses, reference=False, method="ORPO", settings={"lam": 0.1}),  # ORPO's default
    "unlikelihood": Loss(unlikelihood_losses, reference=False),  # the paper's baseline: train.py's unlikelihood, per --ul-alphas
}
LOSS_TYPES = tuple(LOSSES)
REFERENCE_FREE = tuple(name for name, loss in LOSSES.items() if not loss.reference)  # the losses that need no pi_ref


def preference_losses(cfg, token_logps, mask, reference_logps=None):
    """The loss of cfg.loss_type, per example, and the step's metrics."""
    losses, logps, rewards = LOSSES[cfg.loss_type].losses(cfg, token_logps, mask, reference_logps)
    chosen_logps, rejected_logps = logps.detach().chunk(2)
    metrics = {"logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean()}
    if rewards is not None:
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        metrics.update({"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                        "rewards/margins": (chosen_rewards - rejected_rewards).mean()})
    return losses, metrics


# ---------------------------------------------------------------------------- a batch of pairs
def collate(pairs, max_length, device="cpu", append_eot=True):
    """2B right-padded rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1] of prompt + response + EOT.
    The prompt is kept whole; a response too long is cut to fit max_length (its EOT is kept).
    append_eot=False leaves responses as they are (fixed-length samples that did not end).
    Returns tokens (2B, T) and response_mask (2B, T): 1 on response tokens (EOT included)."""
    end = [EOT] if append_eot else []
    rows = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            room = max_length - len(pair.prompt) - len(end)
            rows.append((pair.prompt, getattr(pair, side)[:room] + end))
    width = max(len(p) + len(r) for p, r in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)  # padding id 0 is masked out everywhere
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        tokens[i, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        response_mask[i, len(prompt):len(prompt) + len(response)] = True
    return tokens.to(device), response_mask.to(device)


def concatenated_logps(model, tokens, response_mask):
    """One forward pass over [chosen; rejected] (2B right-padded rows from collate): log pi(y_t | x, y_<t)
    of every response token, 0 elsewhere, (2B, T-1). Right padding needs no attention mask: causal
    attention never lets a real token see the padding after it."""
    return response_token_logps(model, tokens, response_mask)


def kto_pairs(pairs):
    """KTO's rows: each pair, then each prompt followed by the next pair's responses (the mismatched
    rows of its KL estimate). collate makes them [chosen; mismatched; rejected; mismatched]."""
    return pairs + [PreferencePair(p.prompt, q.chosen, q.rejected) for p, q in zip(pairs, pairs[1:] + pairs[:1])]


def kto_logps(model, tokens, response_mask):
    """concatenated_logps of KTO's rows (kto_pairs). The mismatched ones only estimate the KL, which
    kto_loss detaches, so they go through the policy in a second pass without a graph."""
    mismatched = torch.arange(len(tokens), device=tokens.device) // (len(tokens) // 4) % 2 == 1
    with_graph = concatenated_logps(model, tokens[~mismatched], response_mask[~mismatched])
    out = with_graph.new_zeros(len(tokens), with_graph.shape[1])
    out[~mismatched] = with_graph
    with torch.no_grad():
        out[mismatched] = concatenated_logps(model, tokens[mismatched], response_mask[mismatched])
    return out


@torch.no_grad()
def precompute_reference_logps(reference, pairs, batch_size, max_length, device, append_eot=True):
    """Reference log-probs log pi_ref(y|x) of every pair, computed once: (N, 2) float32 [chosen, rejected]."""
    out = []
    for i in range(0, len(pairs), batch_size):
        tokens, mask = collate(pairs[i:i + batch_size], max_length, device, append_eot)
        with autocast(device):
            chosen, rejected = concatenated_logps(reference, tokens, mask).sum(-1).chunk(2)
        out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- the trainer
@dataclass
class DPOConfig:
    sft: str = field(default="out/sft.pt", metadata={"help": "SFT checkpoint or GPT-2 weights (a save_pretrained folder, a published name): the initial policy and the reference"})
    pairs: str = field(default="out/pairs.jsonl", metadata={"help": "preference JSONL (prompt, chosen, rejected)"})
    out: str = field(default="out/dpo", metadata={"help": "run folder for checkpoint and log"})
    name: str = field(default="dpo", metadata={"help": "checkpoint is OUT/NAME.pt, log OUT/NAME_log.jsonl"})
    beta: float = field(default=0.1, metadata={"help": "KL strength beta (paper: 0.1)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (Eq. 7) | ipo | hinge | kto | simpo | orpo | unlikelihood (simpo, orpo, unlikelihood: no reference)"})
    alpha: float = field(default=1.0, metadata={"help": "unlikelihood: weight of the unlikelihood term (paper: 0.05-1)"})
    gamma: float = field(default=0.5, metadata={"help": "simpo: target reward margin (SimPO: 0.5, with beta 2.0)"})
    lam: float = field(default=0.1, metadata={"help": "orpo: weight of the odds-ratio term (ORPO: 0.1)"})
    desirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of desirable (chosen) examples"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of undesirable (rejected) examples"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: probability a label is flipped"})
    batch_size: int = field(default=64, metadata={"help": "pairs per optimizer step (paper: 64)"})
    micro_batch_size: int = field(default=64, metadata={"help": "pairs per forward pass (gradient accumulation)"})
    optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop (paper) | adamw"})
    lr: float = field(default=1e-6, metadata={"help": "learning rate (paper: 1e-6)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps, then constant (paper: 150)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "clip the gradient norm (0 = off)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the pairs (when steps is 0)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0 = epochs x pairs / batch)"})
    max_length: int = field(default=0, metadata={"help": "longest prompt + response + EOT in tokens (0 = the model's context)"})
    append_eot: bool = field(default=True, metadata={"help": "end each response with end-of-text (off for fixed-length samples)"})
    precompute_ref: bool = field(default=False, metadata={"help": "compute reference log-probs once; free the reference model"})
    skip_bad_lines: bool = field(default=False, metadata={"help": "skip (and count) bad preference lines instead of stopping"})
    log_interval: int = field(default=10, metadata={"help": "steps between progress lines"})
    eval_interval: int = field(default=100, metadata={"help": "steps between evaluations", "train_py": True})
    save_interval: int = field(default=500, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (data order)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def validate(self):
        check(self.beta > 0, f"--beta must be > 0, got {self.beta}")
        check(self.loss_type in LOSS_TYPES, f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        check(self.alpha >= 0, f"--alpha must be >= 0, got {self.alpha}")
        check(self.lam >= 0, f"--lam must be >= 0, got {self.lam}")
        check(self.desirable_weight > 0 and self.undesirable_weight > 0, "--desirable-weight and --undesirable-weight must be > 0")
        check(self.loss_type != "kto" or (self.micro_batch_size >= 2 and not self.precompute_ref),
              "--loss-type kto needs --micro-batch-size of at least 2 (its KL estimate pairs each prompt with another "
              "pair's responses) and a live reference (no --precompute-ref)")
        check(0 <= self.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(self.batch_size > 0 and self.micro_batch_size > 0, "--batch-size and --micro-batch-size must be positive")
        check(self.batch_size % self.micro_batch_size == 0,
              f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}")
        check(self.optimizer in ("rmsprop", "adamw"), f"--optimizer must be rmsprop or adamw, got {self.optimizer!r}")
        check(self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip >= 0, "--lr must be > 0; --warmup-steps, --grad-clip >= 0")
        check(self.epochs > 0 and self.steps >= 0, "--epochs must be > 0 and --steps >= 0")
        check(self.max_length == 0 or self.max_length >= 3, f"--max-length must be 0 or at least 3, got {self.max_length}")
        for name in ("log_interval", "eval_interval", "save_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")


def dpo_step(policy, optimizer, micro_batches, reference, cfg, max_length, lr, step, forward=None):
    """One optimizer step of DPO over gradient-accumulated micro-batches, each (pairs, their
    precomputed reference log-probs (B, 2) or None for the live reference). forward is the module
    to call (DDP-wrapped under torchrun); policy owns the weights. Returns the step's metrics."""
    forward = forward if forward is not None else policy  # not `or`: a compiled or DDP module has no truth value
    device = next(policy.parameters()).device
    policy_logps = kto_logps if cfg.loss_type == "kto" else concatenated_logps
    metrics = {}
    for pairs, precomputed in micro_batches:
        tokens, response_mask = collate(kto_pairs(pairs) if cfg.loss_type == "kto" else pairs, max_length, device,
                                        cfg.append_eot)  # (2B, T): [chosen; rejected]
        with autocast(device.type):
            token_logps = policy_logps(forward, tokens, response_mask)  # log pi(y_t | x, y_<t), (2B, T-1)
            reference_logps = None  # log pi_ref(y|x), (2B,): precomputed, live, or none (the reference-free losses)
            if precomputed is not None:
                reference_logps = torch.cat(precomputed.to(device).unbind(1))  # (B, 2) -> [chosen; rejected]
            elif cfg.loss_type not in REFERENCE_FREE:
                with torch.no_grad():
                    reference_logps = concatenated_logps(reference, tokens, response_mask).sum(-1)
            losses, step_metrics = preference_losses(cfg, token_logps, response_mask[:, 1:], reference_logps)  # Eq. 7
        loss = losses.mean()
        (loss / len(micro_batches)).backward()  # the step's gradient is the mean over its micro-batches
        add_metrics(metrics, {"loss": loss, **step_metrics}, len(micro_batches))
    return apply_gradients(policy, optimizer, metrics, lr, cfg.grad_clip, step)


def check_scored(policy, pairs, path, append_eot):
    """A head that scores only some tokens (sft.py --output-vocab) gives any other token log-prob -inf:
    pairs whose responses hold one are refused, naming the first."""
    if policy.output_ids is None:
        return
    responses = [(i, side, getattr(pair, side) + [EOT] * append_eot) for i, pair in enumerate(pairs) for side in ("chosen", "rejected")]
    tokens = torch.tensor([t for _, _, response in responses for t in response], dtype=torch.long)
    unscored = (policy.output_rows(tokens.to(policy.output_ids.device)) < 0).nonzero().cpu()
    if len(unscored):
        ends = torch.tensor([len(r) for _, _, r in responses]).cumsum(0)
        i, side, _ = responses[int(torch.searchsorted(ends, unscored[0], right=True))]
        token = int(tokens[unscored[0]])
        raise UserError(f"pair {i}'s {side} response holds token {token} ({get_encoding().decode([token])!r}), which {path} "
                        f"never emits: its head scores only {len(policy.output_ids):,} tokens (--output-vocab); "
                        f"train SFT with --output-vocab 0 for these pairs")


def make_optimizer(policy, name, lr, weight_decay, device):
    """RMSprop (the paper's) or AdamW, for a preference trainer."""
    if name == "rmsprop":
        return torch.optim.RMSprop(policy.parameters(), lr=lr)
    return adamw(policy, lr, weight_decay, (0.9, 0.999), device)


def train_dpo(cfg, pairs=None, evaluate=None, sample_pairs=None):
    """DPO (or a loss of its family) from the SFT checkpoint (policy init and frozen reference). evaluate(step, policy) -> dict
    is called at step 0, every eval_interval steps and at the end. Resumes from OUT/NAME.pt.
    sample_pairs(step, policy) -> the step's batch_size pairs, drawn from the policy as it is now, takes
    the place of the offline pairs (online DPO, online.py); cfg.steps is then the run's length."""
    device = setup_device(cfg.device)
    check_divisible(cfg.micro_batch_size, "--micro-batch-size")
    policy = load_model(cfg.sft).to(device)
    max_length = cfg.max_length or policy.config.block_size
    if max_length > policy.config.block_size:
        raise UserError(f"--max-length {max_length} exceeds the model's context of {policy.config.block_size}")
    if sample_pairs is not None and (cfg.steps == 0 or cfg.precompute_ref):
        raise UserError("online DPO samples its pairs as it trains: it needs --steps > 0 and no --precompute-ref")
    if pairs is None and sample_pairs is None:
        pairs = read_pairs(cfg.pairs, max_length, cfg.skip_bad_lines)
    if pairs is not None:
        check_scored(policy, pairs, cfg.sft, cfg.append_eot)
    needs_reference = cfg.loss_type not in REFERENCE_FREE
    reference = load_model(cfg.sft).to(device).eval().requires_grad_(False) if needs_reference else None
    policy.train()  # dropout is 0 in both: the log-probs of the policy and the reference are deterministic
    total = cfg.steps or max(1, int(cfg.epochs * len(pairs) / cfg.batch_size))
    optimizer = make_optimizer(policy, cfg.optimizer, cfg.lr, cfg.weight_decay, device)
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    step, _ = resume(ckpt_path, "dpo", cfg, RESUME_FIELDS, policy, optimizer)

    precomputed = None
    if cfg.precompute_ref and needs_reference:
        t0 = time.time()
        precomputed = precompute_reference_logps(reference, pairs, cfg.micro_batch_size, max_length, device, cfg.append_eot)
        reference = None  # the reference model is no longer needed in memory
        print0(f"reference log-probs of {len(pairs)} pairs precomputed in {time.time() - t0:.1f}s")

    forward = data_parallel(policy, device)  # under torchrun; the policy itself otherwise
    progress = Progress(cfg.name, total, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="pairs", start_step=step)
    show = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm") if needs_reference else ("loss", "logps/chosen", "logps/rejected", "grad_norm")
    if evaluate and step == 0:
        progress.record({"step": 0, **evaluate(0, policy)})
    n_micro = cfg.batch_size // cfg.micro_batch_size
    while step < total:
        if sample_pairs is None:
            indices = batch_indices(step, cfg.batch_size, len(pairs), cfg.seed)
        else:  # online: this step's pairs are sampled from the policy as it is now
            pairs, indices = sample_pairs(step, policy), list(range(cfg.batch_size))
        micro_batches = []
        for m in range(n_micro):
            micro = local_slice(indices[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size])  # this rank's share
            micro_batches.append(([pairs[i] for i in micro], None if precomputed is None else precomputed[micro]))
        lr = linear_warmup(cfg.lr, step, cfg.warmup_steps)
        metrics = dpo_step(policy, optimizer, micro_batches, reference, cfg, max_length, lr, step, forward)
        step += 1
        progress.add(cfg.batch_size)
        if step % cfg.log_interval == 0 or step == total:
            progress.line(step, {**metrics, "lr": lr}, show=show)
        if evaluate and (step % cfg.eval_interval == 0 or step == total):
            progress.record({"step": step, **evaluate(step, policy)})
            policy.train()
        if step % cfg.save_interval == 0 or step == total:
            save_checkpoint(ckpt_path, training_checkpoint("dpo", policy, optimizer, cfg, RESUME_FIELDS, step))
    return ckpt_path


def main():
    cfg = parse_config(DPOConfig, description="DPO on a preference JSONL file, starting from an SFT checkpoint.")
    path = train_dpo(cfg)
    print0(f"checkpoint: {path}\ntry: python sample.py --ckpt {path} --prompt \"This movie\" --n 4")


if __name__ == "__main__":
    run_main(main)
