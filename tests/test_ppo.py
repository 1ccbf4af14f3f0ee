"""
Tests of RLHF's two stages beside DPO: PPO's math (ppo.py) and the Bradley-Terry reward model
(bradley_terry.py), plus the paper's Unlikelihood baseline (dpo.unlikelihood_loss).

Every expected value is computed independently of the code under test: Python loops in float64, the
formulas of Schulman et al. 2016/2017 and Ziegler et al. 2019 written out case by case, hand-derived
gradients, the closed-form optimum pi*(y) = pi_ref(y) exp(r(y) / beta) / Z (Eq. 4 of the DPO paper),
a model run on each row alone, or a synthetic preference a reward model must learn.
"""
import itertools
import json
import math
import random

import pytest
import torch

import bradley_terry
import dpo
import ppo
import reward
from bradley_terry import BradleyTerryConfig, bradley_terry_loss, train_bradley_terry
from cli import UserError
from conftest import save_tiny_checkpoint, sharp_gpt, tiny_gpt
from logprobs import completion_token_logps, prompt_completion_rows

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: a second intra-op thread only adds synchronisation, which costs
    milliseconds per op (seconds per test) when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- independent helpers
def log_softmax_at(row, index):
    """log softmax(row)[index] in float64 with plain Python: row is a list of floats."""
    m = max(row)
    return row[index] - (m + math.log(sum(math.exp(z - m) for z in row)))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def total_variation(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


# ---------------------------------------------------------------------------- 1. GAE
def brute_gae(rewards, values, gamma, lam):
    """A_t = sum_{k >= 0} (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V_L = 0: Python lists."""
    advantages = []
    for r, v in zip(rewards, values):
        L = len(r)
        delta = [r[t] + gamma * (v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
        advantages.append([sum((gamma * lam) ** k * delta[t + k] for k in range(L - t)) for t in range(L)])
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.0), (0.5, 0.7), (0.0, 0.5)])
def test_gae_equals_discounted_sum_of_td_errors(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 7, generator=g, dtype=torch.float64)
    values = torch.randn(3, 7, generator=g, dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, gamma, lam)
    expected = brute_gae(rewards.tolist(), values.tolist(), gamma, lam)
    for b in range(3):
        for t in range(7):
            assert advantages[b, t].item() == pytest.approx(expected[b][t], rel=1e-12, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(expected[b][t] + values[b, t].item(), rel=1e-12, abs=1e-12)


def test_gae_with_lambda_zero_is_the_td_error():
    g = torch.Generator().manual_seed(2)
    rewards, values = (torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(2))
    advantages, returns = ppo.gae(rewards, values, 0.9, 0.0)
    r, v = rewards.tolist(), values.tolist()
    for b in range(2):
        for t in range(5):
            next_value = v[b][t + 1] if t + 1 < 5 else 0.0
            assert advantages[b, t].item() == pytest.approx(r[b][t] + 0.9 * next_value - v[b][t], rel=1e-12, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(r[b][t] + 0.9 * next_value, rel=1e-12, abs=1e-12)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(3)
    rewards, values = (torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(2))
    advantages, returns = ppo.gae(rewards, values, 1.0, 1.0)
    r, v = rewards.tolist(), values.tolist()
    for b in range(2):
        for t in range(6):
            reward_to_go = sum(r[b][t:])
            assert advantages[b, t].item() == pytest.approx(reward_to_go - v[b][t], rel=1e-12, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(reward_to_go, rel=1e-12, abs=1e-12)  # the Monte-Carlo return


# ---------------------------------------------------------------------------- 2. the clipped surrogate
RATIOS = [0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 2.0]  # inside and on both sides of [0.8, 1.2]
ADVANTAGES = [1.3, -0.7, 0.0]


def surrogate_case(ratio, advantage, eps):
    """Loss and d loss / d log pi of one token, by cases (Schulman et al. 2017, Eq. 7)."""
    loss = -min(ratio * advantage, min(max(ratio, 1 - eps), 1 + eps) * advantage)
    if (advantage > 0 and ratio > 1 + eps) or (advantage < 0 and ratio < 1 - eps):
        gradient = 0.0  # the clipped term is the minimum and is flat in the ratio
    else:
        gradient = -advantage * ratio  # d(-ratio A) / d log pi = -A ratio (also outside the range, the other way)
    return loss, gradient


def test_policy_loss_and_gradient_match_the_clipped_surrogate_case_by_case():
    eps = 0.2
    cases = list(itertools.product(RATIOS, ADVANTAGES))
    g = torch.Generator().manual_seed(4)
    old_logps = -torch.rand(len(cases), generator=g, dtype=torch.float64) * 5
    log_ratios = torch.tensor([math.log(ratio) for ratio, _ in cases], dtype=torch.float64)
    logps = (old_logps + log_ratios).reshape(3, 7).requires_grad_(True)  # (B, L) as the trainer passes them
    advantages = torch.tensor([a for _, a in cases], dtype=torch.float64).reshape(3, 7)
    losses = ppo.ppo_policy_loss(logps, old_logps.reshape(3, 7), advantages, eps)
    losses.sum().backward()
    n_zero_gradient = n_kept_outside = 0
    for i, (ratio, advantage) in enumerate(cases):
        b, t = divmod(i, 7)
        loss, gradient = surrogate_case(ratio, advantage, eps)
        assert losses[b, t].item() == pytest.approx(loss, rel=1e-12, abs=1e-12), (ratio, advantage)
        assert logps.grad[b, t].item() == pytest.approx(gradient, rel=1e-12, abs=1e-12), (ratio, advantage)
        n_zero_gradient += advantage != 0 and gradient == 0.0
        n_kept_outside += advantage != 0 and abs(ratio - 1) > eps and gradient != 0.0
    assert n_zero_gradient == 4  # A > 0 with ratio 1.21, 2.0; A < 0 with ratio 0.5, 0.79
    assert n_kept_outside == 4  # A > 0 with ratio 0.5, 0.79; A < 0 with ratio 1.21, 2.0: the gradient pulls back


def test_policy_loss_at_ratio_one_is_minus_advantage_and_gradient_is_the_policy_gradient():
    g = torch.Generator().manual_seed(5)
    logps = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    advantages = torch.randn(4, 3, generator=g, dtype=torch.float64)
    losses = ppo.ppo_policy_loss(logps, logps.detach().clone(), advantages, 0.2)
    losses.sum().backward()
    for b in range(4):
        for t in range(3):
            assert losses[b, t].item() == pytest.approx(-advantages[b, t].item(), rel=1e-12, abs=1e-12)
            assert logps.grad[b, t].item() == pytest.approx(-advantages[b, t].item(), rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------- 3. the value loss
@pytest.mark.parametrize("clip", [0.2, 1.0])
def test_value_loss_is_half_the_larger_of_unclipped_and_clipped_squared_errors(clip):
    g = torch.Generator().manual_seed(6)
    values, old_values, returns = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    losses = ppo.ppo_value_loss(values, old_values, returns, clip)
    n_clipped_wins = 0
    for b in range(4):
        for t in range(5):
            v, v_old, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            clipped = v_old + min(max(v - v_old, -clip), clip)
            expected = 0.5 * max((v - ret) ** 2, (clipped - ret) ** 2)
            assert losses[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            n_clipped_wins += (clipped - ret) ** 2 > (v - ret) ** 2
    if clip == 0.2:
        assert n_clipped_wins > 0  # the clipped branch is exercised


# ---------------------------------------------------------------------------- 4. KL-penalised rewards
@pytest.mark.parametrize("L", [1, 6])
def test_kl_penalized_rewards_sum_to_score_minus_beta_log_ratio(L):
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(4, generator=g, dtype=torch.float64)
    policy_logps = -torch.rand(4, L, generator=g, dtype=torch.float64) * 4
    reference_logps = -torch.rand(4, L, generator=g, dtype=torch.float64) * 4
    copies = [x.clone() for x in (scores, policy_logps, reference_logps)]
    kl_coef = 0.3
    rewards = ppo.kl_penalized_rewards(scores, policy_logps, reference_logps, kl_coef)
    for original, copy_ in zip((scores, policy_logps, reference_logps), copies):
        assert torch.equal(original, copy_)  # inputs untouched
    pl, rl, s = policy_logps.tolist(), reference_logps.tolist(), scores.tolist()
    for b in range(4):
        for t in range(L):
            expected = -kl_coef * (pl[b][t] - rl[b][t]) + (s[b] if t == L - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        # summed over tokens: r(x, y) - beta log(pi(y|x) / pi_ref(y|x))
        assert rewards[b].sum().item() == pytest.approx(s[b] - kl_coef * (sum(pl[b]) - sum(rl[b])), rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------- 5. the adaptive KL controller
@pytest.mark.parametrize("kl,target,rate,expected", [
    (5.0, 6.0, 0.1, 0.5 * (1 + 0.1 * (5 / 6 - 1))),  # below target, inside the clip: beta falls
    (6.6, 6.0, 0.1, 0.5 * (1 + 0.1 * 0.1)),  # above target, inside the clip: beta rises
    (6.0, 6.0, 0.1, 0.5),  # on target: unchanged
    (30.0, 6.0, 0.1, 0.5 * (1 + 0.1 * 0.2)),  # far above: error clipped to +0.2
    (0.0, 6.0, 0.1, 0.5 * (1 - 0.1 * 0.2)),  # far below: error clipped to -0.2
    (0.5, 6.0, 1.0, 0.5 * (1 - 0.2)),  # the clip bounds a step at rate * 20%
    (30.0, 0.0, 0.1, 0.5),  # target 0: fixed coefficient
    (0.0, 0.0, 0.1, 0.5),
])
def test_adaptive_kl_coefficient_matches_closed_form(kl, target, rate, expected):
    assert ppo.adapt_kl_coef(0.5, kl, target, rate) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("beta0", [0.01, 5.0])
def test_kl_controller_drives_toy_system_to_coefficient_that_meets_target(beta0):
    """A policy whose KL answers the penalty as KL = c / beta (the Gibbs policy's KL falls as beta rises):
    the controller's fixed point is beta = c / target, reached from far below and far above."""
    c, target, beta = 3.0, 6.0, beta0
    for _ in range(400):
        beta = ppo.adapt_kl_coef(beta, c / beta, target, 0.1)
    assert beta == pytest.approx(c / target, rel=1e-6)
    assert c / beta == pytest.approx(target, rel=1e-6)


# ---------------------------------------------------------------------------- 6. PPO's optimum is DPO's
def run_ppo_bandit(beta, L, kl_coef, iterations=200, batch=256, epochs=4, lr=0.05, seed=0):
    """PPO on a tabular policy over episodes of L tokens (K = 5 actions for L = 1; 3 x 3 for L = 2, the
    second token's distribution conditioned on the first), from the uniform policy, with a fixed KL
    coefficient, zero values, gamma = lam = 1, whitened advantages and Adam with a linearly decaying rate.
    Returns (pi, pi*, uniform) over the K^L sequences, pi* = pi_ref exp(r / beta) / Z in float64 by math.exp."""
    K = 5 if L == 1 else 3
    g = torch.Generator().manual_seed(11)
    ref_first = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), -1)
    ref_second = torch.log_softmax(torch.randn(K, K, generator=g, dtype=torch.float64), -1)  # [y1, y2]
    r = torch.randn(*[K] * L, generator=g, dtype=torch.float64)
    theta_first = torch.nn.Parameter(torch.zeros(K, dtype=torch.float64))
    theta_second = torch.nn.Parameter(torch.zeros(K, K, dtype=torch.float64))
    optimizer = torch.optim.Adam([theta_first, theta_second], lr=lr)
    sampler = torch.Generator().manual_seed(seed)

    def token_logps(actions):  # (B, L): log pi of each token of each episode
        columns = [torch.log_softmax(theta_first, -1)[actions[:, 0]]]
        if L == 2:
            columns.append(torch.log_softmax(theta_second, -1)[actions[:, 0], actions[:, 1]])
        return torch.stack(columns, 1)

    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - iteration / iterations)
        with torch.no_grad():  # the rollout
            first = torch.multinomial(torch.softmax(theta_first, -1), batch, replacement=True, generator=sampler)
            columns = [first]
            if L == 2:
                columns.append(torch.multinomial(torch.softmax(theta_second, -1)[first], 1, generator=sampler)[:, 0])
            actions = torch.stack(columns, 1)  # (B, L)
            old_logps = token_logps(actions)
            reference_logps = torch.stack([ref_first[actions[:, 0]]] + ([ref_second[actions[:, 0], actions[:, 1]]] if L == 2 else []), 1)
            scores = r[tuple(actions.T)]
            rewards = ppo.kl_penalized_rewards(scores, old_logps, reference_logps, kl_coef)
            advantages, _ = ppo.gae(rewards, torch.zeros_like(rewards), 1.0, 1.0)
            advantages = ppo.whiten(advantages)
        for _ in range(epochs):  # the update
            logps = token_logps(actions)
            loss = ppo.ppo_policy_loss(logps, old_logps, advantages, 0.2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    pi, unnormalised = [], []
    log_first, log_second = torch.log_softmax(theta_first.detach(), -1).tolist(), torch.log_softmax(theta_second.detach(), -1).tolist()
    for y in itertools.product(range(K), repeat=L):
        pi.append(math.exp(log_first[y[0]] + (log_second[y[0]][y[1]] if L == 2 else 0.0)))
        ref = ref_first[y[0]].item() + (ref_second[y[0], y[1]].item() if L == 2 else 0.0)
        unnormalised.append(math.exp(ref + r[y].item() / beta))
    pi_star = [u / sum(unnormalised) for u in unnormalised]
    return pi, pi_star, [1 / K ** L] * K ** L


@pytest.mark.parametrize("L", [1, 2], ids=["one-token", "two-token"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_ppo_optimum_is_gibbs_policy_on_bandit(beta, L):
    """PPO with a fixed KL coefficient beta maximises E[r] - beta KL(pi || pi_ref) (Eq. 3), whose maximiser is
    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z (Eq. 4): the policy DPO's bandit test reaches. The two-token
    case also checks that the score arrives at the last token and GAE carries it back to the first.
    Measured by experiment with this loop (seed 0): the total-variation distance ends below 0.003 for
    these settings, while dropping the KL term (kl_coef 0) or flipping its sign ends at 0.75-0.99, and
    a KL coefficient off by a factor of 2 (beta / 2 or 2 beta) ends at 0.04-0.42: all fail the 0.01 bound."""
    pi, pi_star, uniform = run_ppo_bandit(beta, L, kl_coef=beta)
    assert total_variation(pi, pi_star) < 0.01, (pi, pi_star)
    assert total_variation(uniform, pi_star) > 0.3  # the optimum is far from where PPO starts


# ---------------------------------------------------------------------------- 7. the Bradley-Terry loss
def test_bradley_terry_loss_is_minus_log_sigmoid_of_reward_margin_in_float64():
    g = torch.Generator().manual_seed(8)
    chosen = (torch.randn(12, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    rejected = (torch.randn(12, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    losses = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    for i in range(12):
        d = chosen[i].item() - rejected[i].item()
        assert losses[i].item() == pytest.approx(math.log(1 / (1 + math.exp(-d))) * -1, rel=1e-10, abs=1e-12)
        assert chosen.grad[i].item() == pytest.approx(-(1 - sigmoid(d)), rel=1e-10, abs=1e-12)
        assert rejected.grad[i].item() == pytest.approx(1 - sigmoid(d), rel=1e-10, abs=1e-12)


def test_bradley_terry_loss_is_ln2_at_equal_rewards_and_finite_at_large_margins():
    rewards = torch.tensor([-3.0, 0.0, 7.5], dtype=torch.float64)
    assert bradley_terry_loss(rewards, rewards).tolist() == pytest.approx([LN2] * 3, rel=1e-14)
    far = bradley_terry_loss(torch.tensor([-200.0, 200.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert far[0].item() == pytest.approx(200.0, rel=1e-12)  # -log sigmoid(-200) = 200 + log(1 + e^-200)
    assert 0.0 <= far[1].item() < 1e-80


# ---------------------------------------------------------------------------- 8. the Unlikelihood baseline
def brute_unlikelihood(chosen, rejected, chosen_mask, rejected_mask, alpha):
    """-mean over chosen tokens of log p - alpha * mean over rejected tokens of log(1 - p), Python lists in float64."""
    out = []
    for c, r, cm, rm in zip(chosen, rejected, chosen_mask, rejected_mask):
        nll = -sum(x for x, m in zip(c, cm) if m) / sum(cm)
        unlikely = -sum(math.log(-math.expm1(x)) for x, m in zip(r, rm) if m) / sum(rm)  # 1 - e^x, exactly
        out.append(nll + alpha * unlikely)
    return out


def unlikelihood_batch(junk):
    """Token log-probs (3, 6) with masks of different lengths; `junk` fills the masked-out positions."""
    g = torch.Generator().manual_seed(9)
    chosen = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4 - 0.01
    rejected = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4 - 0.01
    chosen_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    rejected_mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    rejected[1, 3], rejected[2, 0] = -1e-4, -1e-5  # p close to 1: log(1 - p) = -9.2, -11.5
    if junk is not None:
        chosen = torch.where(chosen_mask, chosen, junk)
        rejected = torch.where(rejected_mask, rejected, junk)
    return chosen, rejected, chosen_mask, rejected_mask


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("junk", [None, 0.0, -1e4, 3.0], ids=["random", "zero", "very-negative", "positive"])
def test_unlikelihood_loss_equals_brute_force_and_ignores_masked_positions(alpha, junk):
    chosen, rejected, chosen_mask, rejected_mask = unlikelihood_batch(junk)
    chosen, rejected = chosen.requires_grad_(True), rejected.requires_grad_(True)
    losses = dpo.unlikelihood_loss(chosen, rejected, chosen_mask, rejected_mask, alpha)
    expected = brute_unlikelihood(chosen.tolist(), rejected.tolist(), chosen_mask.tolist(), rejected_mask.tolist(), alpha)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    losses.sum().backward()
    for b in range(3):
        n_chosen, n_rejected = int(chosen_mask[b].sum()), int(rejected_mask[b].sum())
        for t in range(6):
            # d/d log p of -log p / n is -1 / n; of -alpha log(1 - e^lp) / n it is alpha e^lp / (1 - e^lp) / n
            expected_chosen = -1 / n_chosen if chosen_mask[b, t] else 0.0
            p = math.exp(rejected[b, t].item())
            expected_rejected = alpha * p / -math.expm1(rejected[b, t].item()) / n_rejected if rejected_mask[b, t] else 0.0
            assert chosen.grad[b, t].item() == pytest.approx(expected_chosen, rel=1e-12, abs=1e-15)
            assert rejected.grad[b, t].item() == pytest.approx(expected_rejected, rel=1e-10, abs=1e-15)
            if alpha > 0 and rejected_mask[b, t]:
                assert rejected.grad[b, t].item() > 0  # gradient descent lowers the rejected token's probability


def test_unlikelihood_with_alpha_zero_is_the_chosen_negative_log_likelihood():
    chosen, rejected, chosen_mask, rejected_mask = unlikelihood_batch(None)
    losses = dpo.unlikelihood_loss(chosen, rejected, chosen_mask, rejected_mask, 0.0)
    for b in range(3):
        tokens = [chosen[b, t].item() for t in range(6) if chosen_mask[b, t]]
        assert losses[b].item() == pytest.approx(-sum(tokens) / len(tokens), rel=1e-12)


@pytest.mark.parametrize("certain", [0.0, -1e-9])
def test_unlikelihood_stays_finite_when_a_rejected_token_is_certain(certain):
    """p = 1 (or 1 - 1e-9): log(1 - p) is -inf (or -20.7) unfloored. The loss and its gradient stay finite,
    the other pairs are unaffected, and the certain token costs at least as much as a likely one."""
    chosen, rejected, chosen_mask, rejected_mask = unlikelihood_batch(None)
    likely = rejected.clone()
    likely[0, 1] = math.log(0.99)
    rejected = rejected.clone()
    rejected[0, 1] = certain
    chosen, rejected = chosen.requires_grad_(True), rejected.requires_grad_(True)
    losses = dpo.unlikelihood_loss(chosen, rejected, chosen_mask, rejected_mask, 1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert rejected.grad[0, 1].item() >= 0.0  # never pushes a rejected token up
    expected = brute_unlikelihood(chosen.tolist(), likely.tolist(), chosen_mask.tolist(), rejected_mask.tolist(), 1.0)
    assert losses[1:].tolist() == pytest.approx(expected[1:], rel=1e-12)
    assert losses[0].item() > expected[0]  # -log(1 - 0.99) = 4.6 per token is less than the certain token's cost


# ---------------------------------------------------------------------------- 9. rows of the rollout
def make_critic(model, seed=0):
    critic = ppo.Critic(model.config)
    critic.gpt.load_state_dict(model.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=g))
        critic.head.bias.fill_(0.3)
    return critic.eval()


PROMPTS = [[5, 17, 3], [42], [7, 8, 9, 10, 11, 12, 13], [99, 1, 64, 2, 30]]
COMPLETIONS = [[11, 12, 13, 14], [0, 100, 50, 25], [3, 3, 3, 3], [88, 77, 66, 55]]


def test_completion_token_logps_equal_each_row_run_alone_without_padding():
    model = sharp_gpt().double()
    ids, mask, _ = prompt_completion_rows(PROMPTS, COMPLETIONS, "cpu")
    assert (mask == 0).any()  # rows of different lengths: some are padded
    with torch.no_grad():
        logps = completion_token_logps(model, ids, mask, 4)
        assert logps.shape == (4, 4) and logps.dtype == torch.float64
        for b, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            row = prompt + completion
            logits = model(torch.tensor([row]))[0].tolist()  # alone: no padding, no mask
            for t in range(4):
                position = len(prompt) + t
                assert logps[b, t].item() == pytest.approx(log_softmax_at(logits[position - 1], row[position]), rel=1e-10, abs=1e-10)


def test_response_values_are_the_critic_at_the_position_that_predicts_each_token():
    """values[:, t] = V(x, y_<t): the critic's output at the prompt's last token for t = 0, then at each completion token."""
    model = sharp_gpt().double()
    critic = make_critic(model).double()
    ids, mask, _ = prompt_completion_rows(PROMPTS, COMPLETIONS, "cpu")
    with torch.no_grad():
        values = ppo.response_values(critic, ids, mask, 4)
        assert values.shape == (4, 4)
        for b, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            alone = critic(torch.tensor([prompt + completion]), None)[0]  # (T,) no padding, no mask
            for t in range(4):
                # response_values returns float32 (its .float()), hence the float32 tolerance
                assert values[b, t].item() == pytest.approx(alone[len(prompt) - 1 + t].item(), rel=1e-6, abs=1e-6)
        shifted = [critic(torch.tensor([p + c]), None)[0, len(p) + 3].item() for p, c in zip(PROMPTS, COMPLETIONS)]
        assert max(abs(v - s) for v, s in zip(values[:, -1].tolist(), shifted)) > 1e-2  # not the value after the last token


def test_rollout_passes_in_chunks_equal_each_row_run_alone(monkeypatch):
    """A rollout computes log pi, log pi_ref and V in a few large no-grad passes (ppo.ROLLOUT_ROWS rows
    each, here 3 over 7 rows: the last chunk short). Each row's numbers equal the row run alone, unpadded,
    through each model, in float64."""
    monkeypatch.setitem(ppo.ROLLOUT_ROWS, "cpu", 3)
    policy, reference = sharp_gpt().double(), sharp_gpt(seed=1).double()
    critic = make_critic(policy).double()
    prompts = PROMPTS + [[4, 4], [60, 61, 62, 63, 64, 65], [2]]
    cfg = ppo.PPOConfig(max_new_tokens=4, seed=3)
    batch, metrics = ppo.rollout(policy, reference, critic, prompts, lambda texts: [0.0] * len(texts), (0.0, 1.0), 0.1, cfg, step=0)
    kls = []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            row = prompt + batch["ids"][b, -4:].tolist()
            policy_logits, reference_logits = policy(torch.tensor([row]))[0].tolist(), reference(torch.tensor([row]))[0].tolist()
            values = critic(torch.tensor([row]), None)[0]
            positions = range(len(prompt), len(row))
            logps = [log_softmax_at(policy_logits[p - 1], row[p]) for p in positions]
            assert batch["logps"][b].tolist() == pytest.approx(logps, rel=1e-10, abs=1e-10)
            assert batch["values"][b].tolist() == pytest.approx(values[len(prompt) - 1:-1].tolist(), rel=1e-6, abs=1e-6)
            kls.append(sum(logps) - sum(log_softmax_at(reference_logits[p - 1], row[p]) for p in positions))
    assert metrics["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-9)
    assert abs(metrics["kl"]) > 1e-3  # two different models: a check of the reference pass, not of zero


# ---------------------------------------------------------------------------- 10. the Bradley-Terry reward model
TOKEN_CHOSEN, TOKEN_REJECTED = 31000, 42000
FILLER = list(range(1000, 1040))


def synthetic_pairs(n, seed):
    """Pairs whose responses share random filler and differ in one token, at a random place:
    TOKEN_CHOSEN in the chosen response, TOKEN_REJECTED in the rejected one."""
    rng, pairs = random.Random(seed), []
    for _ in range(n):
        prompt = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        filler = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        where = rng.randint(0, len(filler))
        chosen, rejected = (filler[:where] + [token] + filler[where:] for token in (TOKEN_CHOSEN, TOKEN_REJECTED))
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_bradley_terry_reward_model_learns_the_preference_and_its_checkpoint_is_reused(tmp_path, monkeypatch):
    cfg = BradleyTerryConfig(sft=save_tiny_checkpoint(tmp_path / "sft.pt", tiny_gpt(block_size=32)),
                             pairs=write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(160, seed=0)),
                             heldout=write_jsonl(tmp_path / "heldout.jsonl", synthetic_pairs(40, seed=1)),
                             out=str(tmp_path), epochs=3.0, batch_size=16, lr=3e-3, warmup_steps=3, evals=3, device="cpu")
    path, accuracy = train_bradley_terry(cfg)
    assert accuracy["heldout_acc"] >= 0.9, accuracy

    # r(x, y) is the raw logit: head(mean of the trunk's features over the row's tokens), computed here by hand
    reward_fn = reward.reward_function(path, "cpu")
    classifier = reward.load_classifier(path)
    fresh = synthetic_pairs(30, seed=2)
    chosen = [p["prompt_ids"] + p["chosen_ids"] for p in fresh]
    rejected = [p["prompt_ids"] + p["rejected_ids"] for p in fresh]
    r_chosen, r_rejected = reward_fn(chosen), reward_fn(rejected)
    assert sum(a > b for a, b in zip(r_chosen, r_rejected)) >= 27  # fresh pairs ranked as the preference says
    with torch.no_grad():
        for sequence, value in zip(chosen[:3] + rejected[:3], list(r_chosen[:3]) + list(r_rejected[:3])):
            features = classifier.gpt.hidden_states(torch.tensor([sequence]))[0].double()  # (T, C), unpadded
            pooled = features.mean(0).tolist()
            logit = sum(w * f for w, f in zip(classifier.head.weight[0].tolist(), pooled)) + classifier.head.bias.item()
            assert value == pytest.approx(logit, rel=1e-4, abs=1e-4)
    assert any(v < 0 or v > 1 for v in list(r_chosen) + list(r_rejected))  # not a probability

    # the finished checkpoint stands for its run: nothing is built or trained the second time
    def no_training(*args, **kwargs):
        raise AssertionError("train_bradley_terry retrained a finished run")
    monkeypatch.setattr(bradley_terry, "GPTClassifier", no_training)
    monkeypatch.setattr(bradley_terry, "load_model", no_training)
    again_path, again = train_bradley_terry(cfg)
    assert again_path == path and again == accuracy
    with pytest.raises(UserError, match="different settings"):  # another run's checkpoint is refused
        train_bradley_terry(BradleyTerryConfig(**{**cfg.__dict__, "lr": 1e-3}))
