"""
The paper's evaluation of the IMDb experiment: sample completions of held-out prompts from the
policy, score them with the ground-truth reward, and measure how far the policy moved from the
reference with the sequence-level KL(pi || pi_ref). Each evaluation is one point of the
reward-vs-KL frontier (Figure 2, left).
"""
import time

import torch

from checkpoint import append_jsonl, atomic_write
from device import autocast, gather, local_slice, print0, rank
from model import left_pad
from sample import generate

KL_ROWS = 64  # sequences per KL forward pass: their (rows, T, V) logits and float32 temporaries bound the memory


def sequence_kl(policy_logits, reference_logits, response_mask):
    """KL(pi(y|x) || pi_ref(y|x)) of the sampled sequences, estimated as the paper does: the sum over
    generated positions t of the exact per-step KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), whose
    expectation under y ~ pi is the sequence-level KL. Logits (B, T, V) with logits[:, t] predicting
    token t + 1; response_mask (B, T) marks generated tokens. Returns (B,) float32."""
    policy_logp = policy_logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V): predicts tokens 1..T-1
    reference_logp = reference_logits[:, :-1].float().log_softmax(-1)
    step_kl = (policy_logp.exp() * (policy_logp - reference_logp)).sum(-1)  # (B, T-1)
    return torch.where(response_mask[:, 1:].bool(), step_kl, 0.0).sum(-1)


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, prompts, max_new_tokens, batch_size, seed):
    """Mean reward and mean sequence KL over one completion per prompt (temperature 1, full
    vocabulary, fixed length). Returns dict(reward, kl) and the completions (of this rank's share
    of the prompts under torchrun; the means are over all prompts)."""
    policy_was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + rank())
    prompts = local_slice(prompts)
    completions = generate(policy, prompts, max_new_tokens, stop_at_eot=False, generator=generator, batch_size=batch_size)
    kls = []
    for i in range(0, len(prompts), KL_ROWS):
        sequences = [p + c for p, c in zip(prompts[i:i + KL_ROWS], completions[i:i + KL_ROWS])]
        ids, mask = left_pad(sequences, device=device)  # same prompt lengths per row: completions are fixed length
        response_mask = torch.zeros_like(mask)
        response_mask[:, -max_new_tokens:] = 1
        with autocast(device.type):
            kls.append(sequence_kl(policy(ids, mask), reference(ids, mask), response_mask).cpu())
    rewards = gather(reward_model.score([p + c for p, c in zip(prompts, completions)]).tolist())
    kls = gather(torch.cat(kls + [torch.zeros(0)]).tolist())
    policy.train(policy_was_training)
    return {"reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls)}, completions


class Evaluator:
    """Every method's evaluation on the same held-out prefixes, with the same reference and reward
    model: evaluator(policy, method, beta, step, log_path) appends one frontier point to log_path."""

    def __init__(self, reference, reward_model, prompts, max_new_tokens, batch_size, seed):
        self.reference, self.reward_model, self.prompts = reference, reward_model, prompts
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self.t0 = time.time()

    def __call__(self, policy, method, beta, step, log_path):
        metrics, completions = evaluate_policy(policy, self.reference, self.reward_model, self.prompts,
                                               self.max_new_tokens, self.batch_size, seed=self.seed)
        append_jsonl(log_path, {"method": method, "beta": beta, "step": step, **metrics, "wall_time": time.time() - self.t0})
        print0(f"eval {method} beta={beta} step {step}: reward {metrics['reward']:.3f} | kl {shown_kl(metrics['kl'], 3)}")
        return metrics, completions


def shown_kl(kl, digits):
    """A KL for people: never negative (a true KL is >= 0; a tiny negative is float32 rounding), so
    a KL that rounds to zero reads 0.00, not -0.00."""
    return f"{max(kl, 0.0):.{digits}f}"


def plot_frontier(rows, path):
    """Reward vs KL, one series per method (and beta), like the paper's Figure 2 (left)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for row in rows:
        label = row["method"] if row.get("beta") is None else f"{row['method']} beta={row['beta']:g}"
        series.setdefault(label, []).append((row["kl"], row["reward"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in sorted(series.items()):
        kl, reward = zip(*sorted(points))
        style = dict(marker="*", s=150, zorder=3) if len(points) == 1 else dict(s=18, alpha=0.8)
        ax.scatter(kl, reward, label=label, **style)
    ax.set_xlabel("KL(pi || pi_ref)  [nats, sum over generated tokens]")
    ax.set_ylabel("mean reward  P(positive)")
    ax.set_title("IMDb sentiment: reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
