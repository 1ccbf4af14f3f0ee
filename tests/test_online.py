"""
Tests of the DPO family's methods that make their own samples: online DPO and SPPO (online.py) and
RSO's rejection sampling (pairs.py).

Expected values come from elsewhere than the code under test: Python loops in float64, the papers'
formulas, exact distributions (pi* of Eq. 4, against which rejection sampling's draws are counted),
and runs that are killed and rerun against runs never interrupted.
"""
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dpo
import online
import pairs
from checkpoint import save_checkpoint
from conftest import kill_when_written, save_tiny_checkpoint, sharp_gpt
from reward import NgramClassifier, NgramConfig
from sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


# ---------------------------------------------------------------------------- SPPO's win rates and loss
@pytest.mark.parametrize("k", [2, 3, 5])
def test_win_rates_equal_a_float64_loop_over_the_other_samples(k):
    rewards = torch.randn(4, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3
    r = rewards.tolist()
    expected = [sum(sigmoid(r[n][i] - r[n][j]) for j in range(k) if j != i) / (k - 1) for n in range(4) for i in range(k)]
    assert online.win_rates(rewards).flatten().tolist() == pytest.approx(expected, abs=1e-12)
    # each pair's two preferences sum to 1, so a prompt's win rates average 1/2
    assert online.win_rates(rewards).mean(1).tolist() == pytest.approx([0.5] * 4, abs=1e-12)


def test_win_rates_of_two_samples_are_the_bradley_terry_preference_and_of_equal_rewards_one_half():
    rewards = torch.tensor([[2.0, -1.0], [0.3, 0.3]], dtype=torch.float64)
    p = online.win_rates(rewards)
    assert p[0].tolist() == pytest.approx([sigmoid(3.0), sigmoid(-3.0)], abs=1e-12)
    assert p[1].tolist() == [0.5, 0.5]
    assert online.win_rates(torch.full((1, 4), 7.0)).flatten().tolist() == [0.5] * 4


def test_sppo_loss_and_gradient_equal_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(6, generator=g, dtype=torch.float64) * 5).requires_grad_()
    reference = torch.randn(6, generator=g, dtype=torch.float64) * 5
    win = torch.rand(6, generator=g, dtype=torch.float64)
    eta = 3.0
    losses = dpo.sppo_loss(policy, reference, win, eta)
    a, b, p = policy.tolist(), reference.tolist(), win.tolist()
    assert losses.tolist() == pytest.approx([(a[i] - b[i] - eta * (p[i] - 0.5)) ** 2 for i in range(6)], rel=1e-12)
    losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([2 * (a[i] - b[i] - eta * (p[i] - 0.5)) for i in range(6)], rel=1e-12)


def test_sppo_gradient_at_pi_t_is_the_policy_gradient_of_the_centred_win_rate():
    """At pi = pi_t the gradient with respect to log pi(y|x) is -2 eta (P - 1/2): a completion that wins
    more often than not is pushed up, one that loses is pushed down, and one at 1/2 is left alone."""
    logps = torch.tensor([-4.0, -4.0, -4.0], dtype=torch.float64, requires_grad=True)
    win = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    dpo.sppo_loss(logps, logps.detach().clone(), win, eta=5.0).sum().backward()
    assert logps.grad.tolist() == pytest.approx([-2 * 5.0 * 0.4, 0.0, 2 * 5.0 * 0.3], abs=1e-12)


# ---------------------------------------------------------------------------- RSO's rejection sampling
def test_rejection_sampling_draws_the_optimal_policy_of_eq_4():
    """Candidates drawn from pi_ref over three outcomes; the accepted one is a draw of
    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, counted over 20,000 trials."""
    pi_ref, r, beta = np.array([0.5, 0.3, 0.2]), np.array([0.0, 0.5, 1.0]), 0.5
    target = pi_ref * np.exp(r / beta)
    target /= target.sum()
    rng = np.random.default_rng(0)
    counts = np.zeros(3)
    for _ in range(20_000):
        candidates = rng.choice(3, size=40, p=pi_ref)  # the best outcome is among them but with prob 0.8^40
        first = pairs.rejection_sample(r[candidates], 1, beta, rng)[0]
        counts[candidates[first]] += 1
    assert counts / counts.sum() == pytest.approx(target, abs=0.012)  # 3.5 standard errors
    assert not np.allclose(target, pi_ref, atol=0.1)  # the reweighting is large enough to see


def test_rejection_sampling_at_extreme_beta_keeps_the_first_or_the_best_candidates():
    rewards = np.array([0.2, 3.0, -1.0, 2.5, 0.7])
    rng = np.random.default_rng(0)
    assert pairs.rejection_sample(rewards, 3, beta=1e12, rng=rng) == [0, 1, 2]  # pi* = pi_ref: every candidate passes
    assert pairs.rejection_sample(rewards, 3, beta=1e-6, rng=rng) == [1, 3, 4]  # pi* puts all its mass on the best
    assert sorted(pairs.rejection_sample(rewards, 5, beta=0.5, rng=rng)) == [0, 1, 2, 3, 4]  # asked for all: all


def test_acceptance_rate_is_the_mean_acceptance_probability_in_float64():
    rewards = np.array([[0.0, 1.0, 2.0], [5.0, 5.0, 3.0]])
    beta = 0.7
    expected = np.mean([math.exp((x - max(row)) / beta) for row in rewards.tolist() for x in row])
    assert pairs.acceptance_rate(rewards, beta) == pytest.approx(expected, rel=1e-12)
    assert pairs.acceptance_rate(np.zeros((2, 4)), beta) == 1.0


def test_rso_pairs_accept_by_the_learned_reward_and_label_by_the_ground_truth():
    """At a tiny beta the accepted samples of each prompt are its best under the learned reward; the
    ground truth (here ranking the other way) then decides chosen and rejected."""
    policy = sharp_gpt()
    prompts = [[1, 2], [3, 4, 5], [6]]
    learned = lambda sequences: np.array([float(sum(s[-3:])) for s in sequences])  # noqa: E731
    made, rate = pairs.rso_pairs(policy, learned, NegatedTokenSum(), prompts, n_candidates=6, n_accept=3, beta=1e-6,
                                 max_new_tokens=3, batch_size=8, seed=0)
    # the same candidates, sampled again with the same seed
    _, candidates, _ = pairs.sample_completions(policy, prompts, 6, 3, 8, seed=0)
    for n, prompt in enumerate(prompts):
        mine = [p for p in made if p["prompt_ids"] == prompt]
        kept = {tuple(p[side]) for p in mine for side in ("chosen_ids", "rejected_ids")}
        best = sorted(candidates[6 * n:6 * n + 6], key=lambda c: -sum(c))[:3]
        assert kept == {tuple(c) for c in best}
        assert len(mine) == 3  # every pair of three distinct samples
        assert all(sum(p["chosen_ids"]) <= sum(p["rejected_ids"]) for p in mine)  # the ground truth's order, not the learned one's
    assert 0 < rate < 1


class NegatedTokenSum:
    """A ground truth that ranks completions opposite to the learned reward above."""

    def score(self, sequences):
        return np.array([-float(sum(s[-3:])) for s in sequences])


# ---------------------------------------------------------------------------- online DPO's pairs
def test_online_pairs_are_the_policys_own_samples_ordered_by_reward_and_a_function_of_seed_and_step():
    policy = sharp_gpt()
    weights = {k: v.clone() for k, v in policy.state_dict().items()}
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8]]
    reward = lambda sequences: np.array([float(sum(s[-4:])) for s in sequences])  # noqa: E731
    batch = online.online_pairs(3, policy, prompts, reward, batch_size=6, max_new_tokens=4, seed=0)
    assert len(batch) == 6 and all(p.prompt in prompts for p in batch)
    assert all(len(p.chosen) == len(p.rejected) == 4 for p in batch)
    assert all(sum(p.chosen) >= sum(p.rejected) for p in batch)
    assert any(p.chosen != p.rejected for p in batch)
    assert online.online_pairs(3, policy, prompts, reward, 6, 4, seed=0) == batch  # what a resumed run draws
    assert online.online_pairs(4, policy, prompts, reward, 6, 4, seed=0) != batch  # another step, other samples
    assert all(torch.equal(v, weights[k]) for k, v in policy.state_dict().items())


# ---------------------------------------------------------------------------- the trainers
def planted_reward(path, good_tokens):
    """A ground-truth checkpoint (an n-gram classifier over single tokens) whose logit is +2 for each
    good token of a text and -2 for each other token, scaled as the classifier scales."""
    model = NgramClassifier(NgramConfig(order=1, bits=16), words=torch.arange(50257))
    with torch.no_grad():
        model.table.weight.fill_(-2.0)
        for t in good_tokens:
            model.table.weight[model.ngrams([t])[0]] = 2.0
    save_checkpoint(str(path), {"kind": "reward", "classifier": "ngram", "model": model.state_dict(),
                                "model_config": dataclasses.asdict(model.config)})
    return str(path)


def test_sppo_raises_the_win_rate_of_a_planted_preference(tmp_path):
    """A small GPT over 101 tokens, a reward that likes tokens 0..29: after SPPO's iterations its
    samples hold more of them than the starting model's."""
    sft = save_tiny_checkpoint(tmp_path / "sft.pt", sharp_gpt(vocab_size=101))
    good = list(range(30))
    cfg = online.SPPOConfig(sft=sft, reward=planted_reward(tmp_path / "reward.pt", good), out=str(tmp_path / "sppo"),
                            iterations=3, prompts_per_iteration=16, samples_per_prompt=4, eta=4.0, batch_size=16,
                            optimizer="adamw", lr=3e-3, warmup_steps=0, max_new_tokens=6, device="cpu")
    prompts = [[40 + i, 50 + i] for i in range(8)]
    shares = []

    def evaluate(step, policy):
        samples = generate(policy, prompts * 8, 6, stop_at_eot=False, generator=torch.Generator().manual_seed(1))
        shares.append(np.mean([t in good for c in samples for t in c]))
        return {"good": shares[-1]}
    online.train_sppo(cfg, prompts, evaluate=evaluate)
    assert len(shares) == 4  # step 0 and after each iteration
    assert shares[-1] > shares[0] + 0.15, shares


def test_online_dpo_needs_a_step_count_and_a_live_reference(tmp_path):
    sft = save_tiny_checkpoint(tmp_path / "sft.pt")
    for extra in ({"steps": 0}, {"steps": 2, "precompute_ref": True}):
        cfg = dpo.DPOConfig(sft=sft, out=str(tmp_path / "o"), device="cpu", **extra)
        with pytest.raises(dpo.UserError, match="--steps > 0 and no --precompute-ref"):
            dpo.train_dpo(cfg, sample_pairs=lambda step, policy: [])


RUN_SCRIPT = """
import sys
import numpy as np
import dpo, online
from reward import reward_function
method, sft, reward_path, out = sys.argv[1:]
prompts = [[40 + i, 50 + i] for i in range(8)]
if method == "sppo":
    cfg = online.SPPOConfig(sft=sft, reward=reward_path, out=out, iterations=4, prompts_per_iteration=8, samples_per_prompt=2,
                            batch_size=8, lr=1e-3, warmup_steps=1, max_new_tokens=5, device="cpu")
    online.train_sppo(cfg, prompts)
else:
    reward_fn = reward_function(reward_path, "cpu")
    cfg = dpo.DPOConfig(sft=sft, pairs="(online)", out=out, name="online_dpo", batch_size=4, micro_batch_size=2, lr=1e-3,
                        warmup_steps=1, steps=5, append_eot=False, save_interval=1, device="cpu")
    dpo.train_dpo(cfg, sample_pairs=lambda step, policy: online.online_pairs(step, policy, prompts, reward_fn, 4, 5, 0))
"""


@pytest.mark.parametrize("method, name, steps", [("sppo", "sppo", 8), ("online_dpo", "online_dpo", 5)])
def test_online_run_killed_mid_run_resumes_and_ends_on_the_same_weights(tmp_path, method, name, steps):
    """Each step's samples are a pure function of (seed, step) and the weights: a SIGKILLed run, rerun,
    ends bit-identical to one never interrupted (SPPO redoes the iteration it was killed in)."""
    sft = save_tiny_checkpoint(tmp_path / "sft.pt", sharp_gpt(vocab_size=101))
    reward_path = planted_reward(tmp_path / "reward.pt", range(30))
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT}

    def argv(out):
        return [str(script), method, sft, reward_path, str(out)]
    subprocess.run([sys.executable] + argv(tmp_path / "straight"), cwd=tmp_path, env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_when_written(argv(killed), killed / f"{name}.pt", tmp_path, env)
    step_at_kill = torch.load(killed / f"{name}.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < steps
    resumed = subprocess.run([sys.executable] + argv(killed), cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert f"resuming {killed / f'{name}.pt'} at step {step_at_kill}\n" in resumed.stdout
    a, b = (torch.load(out / f"{name}.pt", weights_only=True) for out in (killed, tmp_path / "straight"))
    assert a["step"] == b["step"] == steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(not torch.equal(a["model"][k], torch.load(sft, weights_only=True)["model"][k]) for k in a["model"])
