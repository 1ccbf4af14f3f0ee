"""
The paper's preference data for the IMDb experiment: for each prompt, sample k completions from
the SFT model, score each with the ground-truth reward r(x, y), and keep every pair of distinct
completions with chosen = the higher reward (k = 4 gives 6 pairs per prompt).
"""
import time

import numpy as np
import torch

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


def sample_and_label(policy, reward_model, prompts, k, max_new_tokens, batch_size, seed):
    """k completions of every prompt (temperature 1, full vocabulary, max_new_tokens each), labelled
    by the reward model and paired. Returns (pairs as JSON-ready dicts, mean reward, sampling tokens/s)."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + rank())
    t0 = time.time()
    repeated = [p for p in prompts for _ in range(k)]
    local = local_slice(repeated)  # under torchrun each rank samples a share
    completions = []
    for i in range(0, len(local), batch_size):  # batches, with a progress line each
        completions += generate(policy, local[i:i + batch_size], max_new_tokens, stop_at_eot=False, generator=generator)
        done, elapsed = len(completions), time.time() - t0
        print0(f"pairs: sampled {done}/{len(local)} | {done * max_new_tokens / elapsed:.0f} tok/s | "
               f"eta {format_seconds((len(local) - done) * elapsed / done)}")
    tokens_per_s = len(repeated) * max_new_tokens / (time.time() - t0)
    rewards = np.array(gather(reward_model.score([p + c for p, c in zip(local, completions)]).tolist()))
    completions = gather(completions)
    enc = get_encoding()
    pairs = []
    for n, prompt in enumerate(prompts):
        pairs += all_pairs(prompt, completions[n * k:(n + 1) * k], rewards[n * k:(n + 1) * k])
    for pair in pairs:  # readable text beside the exact ids (ids take precedence when read back)
        pair.update(prompt=enc.decode(pair["prompt_ids"]), chosen=enc.decode(pair["chosen_ids"]),
                    rejected=enc.decode(pair["rejected_ids"]))
    return pairs, float(rewards.mean()), tokens_per_s


def best_completions(pairs):
    """Preferred-FT's data: per prompt, the prompt followed by its highest-reward completion."""
    best = {}
    for p in pairs:
        key = tuple(p["prompt_ids"])
        if key not in best or p["chosen_reward"] > best[key][1]:
            best[key] = (p["prompt_ids"] + p["chosen_ids"], p["chosen_reward"])
    return [sequence for sequence, _ in best.values()]
