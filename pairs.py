"""
The paper's preference data for the IMDb experiment: for each prompt, sample k completions from
the SFT model, score each with the ground-truth reward r(x, y), and keep every pair of distinct
completions with chosen = the higher reward (k = 4 gives 6 pairs per prompt).

RSO's data (rso_pairs) is made the same way from other samples: those of the optimal policy of
Eq. 4, drawn from many SFT samples by rejection sampling under the learned reward.
"""
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cli import check
from data import get_encoding
from device import gather, local_slice, print0, rank
from progress import format_seconds
from sample import generate


def all_pairs(prompt, completions, rewards):
    """Every pair of distinct completions of one prompt, chosen = the higher reward (6 pairs from 4)."""
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if completions[i] == completions[j]:
                continue  # identical samples carry no preference
            w, l = (i, j) if rewards[i] >= rewards[j] else (j, i)
            pairs.append({"prompt_ids": prompt, "chosen_ids": completions[w], "rejected_ids": completions[l],
                          "chosen_reward": float(rewards[w]), "rejected_reward": float(rewards[l])})
    return pairs


def sample_completions(policy, prompts, k, max_new_tokens, batch_size, seed):
    """k completions of every prompt (temperature 1, full vocabulary, max_new_tokens each), the k of
    prompt n at [n * k, (n + 1) * k). Returns (the prompts repeated k times, completions, tokens/s)."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + rank())
    t0 = time.time()
    repeated = [p for p in prompts for _ in range(k)]
    local = local_slice(repeated)  # under torchrun each rank samples a share
    completions = []
    for i in range(0, len(local), batch_size):  # batches, with a progress line each
        completions += generate(policy, local[i:i + batch_size], max_new_tokens, stop_at_eot=False, generator=generator)
        done, elapsed = len(completions), time.time() - t0
        print0(f"sampled {done}/{len(local)} | {done * max_new_tokens / elapsed:.0f} tok/s | "
               f"eta {format_seconds((len(local) - done) * elapsed / done)}")
    tokens_per_s = len(repeated) * max_new_tokens / (time.time() - t0)
    return repeated, gather(completions), tokens_per_s


def sample_and_label(policy, reward_model, prompts, k, max_new_tokens, batch_size, seed):
    """k SFT completions of every prompt, labelled by the reward model and paired.
    Returns (pairs as JSON-ready dicts, mean reward, sampling tokens/s)."""
    repeated, completions, tokens_per_s = sample_completions(policy, prompts, k, max_new_tokens, batch_size, seed)
    rewards = reward_model.score([p + c for p, c in zip(repeated, completions)])
    pairs = []
    for n, prompt in enumerate(prompts):
        pairs += all_pairs(prompt, completions[n * k:(n + 1) * k], rewards[n * k:(n + 1) * k])
    return with_text(pairs), float(rewards.mean()), tokens_per_s


def with_text(pairs):
    """Readable text beside the exact ids (ids take precedence when read back)."""
    enc = get_encoding()
    for pair in pairs:
        pair.update(prompt=enc.decode(pair["prompt_ids"]), chosen=enc.decode(pair["chosen_ids"]),
                    rejected=enc.decode(pair["rejected_ids"]))
    return pairs


# ---------------------------------------------------------------------------- RSO
def rejection_sample(rewards, n_accept, beta, rng):
    """Statistical rejection sampling (RSO, Liu et al. 2023, Algorithm 1): of candidates y_i drawn from
    pi_ref, with rewards r_i, accept n_accept as draws from the optimal policy of Eq. 4,
        pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x).
    Over the candidates, pi* / pi_ref = exp(r / beta) / Z is at most exp(M / beta) / Z for the envelope
    M = max_i r_i, so candidate i is accepted with probability exp((r_i - M) / beta). A pass goes through the remaining candidates in
    order; passes repeat, each with the envelope of those remaining (whose best is always accepted),
    until n_accept are accepted. Returns their indices, in the order accepted."""
    remaining, accepted = list(range(len(rewards))), []
    while len(accepted) < n_accept:
        envelope = max(rewards[i] for i in remaining)
        for i in list(remaining):
            if rng.random() < np.exp((rewards[i] - envelope) / beta):
                accepted.append(i)
                remaining.remove(i)
                if len(accepted) == n_accept:
                    break
    return accepted


def acceptance_rate(rewards, beta):
    """The probability that one candidate from pi_ref is accepted, exp((r - M) / beta) averaged over
    candidates and prompts, rewards (N, candidates): plain rejection sampling draws 1 / rate
    candidates for each sample of pi*."""
    return float(np.exp((rewards - rewards.max(1, keepdims=True)) / beta).mean())


@dataclass
class RSOConfig:
    """RSO's sampling: the first `prefixes` training prefixes, `candidates` SFT samples of each, and
    `accept` of those accepted by rejection sampling."""
    prefixes: int = field(default=240, metadata={"help": "training prefixes it samples (the first ones)"})
    candidates: int = field(default=8, metadata={"help": "SFT samples per prefix to accept from (RSO: 64)"})
    accept: int = field(default=4, metadata={"help": "samples of pi* accepted per prefix, all their pairs kept (RSO: 8)"})

    def validate(self):
        check(self.prefixes > 0 and 2 <= self.accept <= self.candidates,
              f"RSO needs --prefixes > 0 and 2 <= --accept <= --candidates, got {self.prefixes}, {self.accept}, {self.candidates}")


def rso_pairs(policy, learned_reward, ground_truth, prompts, n_candidates, n_accept, beta, max_new_tokens, batch_size, seed):
    """RSO's preference data: n_candidates SFT samples of every prompt, n_accept of them accepted by
    rejection sampling under the learned reward (draws of pi*), and every pair of the accepted,
    labelled by the ground truth as the offline pairs are: only where the samples come from differs.
    Returns (pairs as JSON-ready dicts, acceptance rate)."""
    repeated, completions, _ = sample_completions(policy, prompts, n_candidates, max_new_tokens, batch_size, seed)
    rewards = learned_reward([p + c for p, c in zip(repeated, completions)]).reshape(len(prompts), n_candidates)
    rng = np.random.default_rng(seed)
    accepted = [[completions[n * n_candidates + i] for i in rejection_sample(rewards[n], n_accept, beta, rng)]
                for n in range(len(prompts))]
    labels = ground_truth.score([p + c for p, kept in zip(prompts, accepted) for c in kept]).reshape(len(prompts), n_accept)
    pairs = [pair for p, kept, r in zip(prompts, accepted, labels) for pair in all_pairs(p, kept, r)]
    return with_text(pairs), acceptance_rate(rewards, beta)


def best_completions(pairs):
    """Preferred-FT's data: per prompt, the prompt followed by its highest-reward completion."""
    best = {}
    for p in pairs:
        key = tuple(p["prompt_ids"])
        if key not in best or p["chosen_reward"] > best[key][1]:
            best[key] = (p["prompt_ids"] + p["chosen_ids"], p["chosen_reward"])
    return [sequence for sequence, _ in best.values()]
