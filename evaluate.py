"""
The paper's evaluation of the IMDb experiment: sample completions of held-out prompts from the
policy, score them with the ground-truth reward, and measure how far the policy moved from the
reference with the sequence-level KL(pi || pi_ref). Each evaluation is one point of the
reward-vs-KL frontier (Figure 2, left).
"""
import torch

from common import atomic_write, autocast, gather, local_slice, rank
from sample import generate, left_pad


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
    for i in range(0, len(prompts), batch_size):
        sequences = [p + c for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        ids, mask = left_pad(sequences, device=device)  # same prompt lengths per row: completions are fixed length
        response_mask = torch.zeros_like(mask)
        response_mask[:, -max_new_tokens:] = 1
        with autocast(device.type):
            kls.append(sequence_kl(policy(ids, mask), reference(ids, mask), response_mask).cpu())
    rewards = gather(reward_model.score([p + c for p, c in zip(prompts, completions)]).tolist())
    kls = gather(torch.cat(kls + [torch.zeros(0)]).tolist())
    policy.train(policy_was_training)
    return {"reward": sum(rewards) / len(rewards), "kl": sum(kls) / len(kls)}, completions


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
