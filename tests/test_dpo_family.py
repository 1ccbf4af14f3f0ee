"""
Tests of the DPO family in dpo.py: the length-averaged log-likelihood, SimPO (Meng et al. 2024),
ORPO (Hong et al. 2024) and KTO (Ethayarajh et al. 2024), alone and inside a DPO step.

Every expected value is computed independently of the code under test: brute-force Python loops over
positions in float64, the papers' formulas written with math.log / math.exp, and gradients derived by hand.
"""
import math

import pytest
import torch

import dpo
import logprobs
from conftest import brute_response_logps, gather_case, log_softmax_at, tiny_gpt


# ---------------------------------------------------------------------------- independent helpers
def sequence_logps(logits, tokens, response_mask, average=False):
    """logprobs.sequence_logps of full logits (B, T, V), as the trainers' preference_losses takes it."""
    return logprobs.sequence_logps(logprobs.token_logps(logits, tokens), response_mask[:, 1:].bool(), average)


def log_sigmoid(z):
    """log(1 / (1 + exp(-z))), written so neither branch overflows."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z):
    return math.exp(log_sigmoid(z))


def log_odds(a):
    """log(p / (1 - p)) for p = e^a < 1, in float64: a - log(1 - e^a), the latter as log(-expm1(a))."""
    return a - math.log(-math.expm1(a))


def random_doubles(seed, n, low, high):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


# ---------------------------------------------------------------------------- 1. the length-averaged log-likelihood
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_average_sequence_logps_is_the_mean_over_response_tokens_by_a_float64_loop(dtype):
    logits, tokens, response_mask, _ = gather_case(dtype=dtype)
    got = sequence_logps(logits, tokens, response_mask, average=True)
    assert got.shape == (4,) and got.dtype == dtype
    brute = brute_response_logps(logits, tokens, response_mask)
    assert len({count for _, count in brute}) > 1, "the rows should have responses of different lengths"
    expected = torch.tensor([total / count for total, count in brute], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_average_sequence_logps_ignores_prompt_and_padding():
    logits, tokens, response_mask, spans = gather_case(seed=1)
    expected = torch.tensor([total / count for total, count in brute_response_logps(logits, tokens, response_mask)],
                            dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    changed_logits, changed_tokens = logits.clone(), tokens.clone()
    B, T, V = logits.shape
    for b, (start, end) in enumerate(spans):
        used_rows = set(range(start - 1, end - 1))  # only these logits rows predict response tokens
        for t in range(T):
            if t not in used_rows:
                changed_logits[b, t] = torch.randn(V, generator=g) * 1e3
        changed_tokens[b, :start] = torch.randint(0, V, (start,), generator=g)  # prompt tokens
        changed_tokens[b, end:] = torch.randint(0, V, (T - end,), generator=g)  # padding
    # appended padding, masked out, must not count in the sum nor in the number of tokens
    changed_logits = torch.cat([changed_logits, torch.randn(B, 5, V, generator=g) * 50], dim=1)
    changed_tokens = torch.cat([changed_tokens, torch.randint(0, V, (B, 5), generator=g)], dim=1)
    longer_mask = torch.cat([response_mask, torch.zeros(B, 5, dtype=torch.bool)], dim=1)
    got = sequence_logps(changed_logits, changed_tokens, longer_mask, average=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_average_times_response_length_is_the_sum():
    logits, tokens, response_mask, spans = gather_case(seed=2, dtype=torch.float64)
    average = sequence_logps(logits, tokens, response_mask, average=True)
    lengths = torch.tensor([end - start for start, end in spans], dtype=torch.float64)  # response tokens per row
    brute_sums = torch.tensor([total for total, _ in brute_response_logps(logits, tokens, response_mask)], dtype=torch.float64)
    torch.testing.assert_close(average * lengths, brute_sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(average * lengths, sequence_logps(logits, tokens, response_mask), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- 2. SimPO
@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (10.0, 0.0)])
def test_simpo_loss_equals_its_formula_by_loops_in_float64(beta, gamma):
    chosen, rejected = random_doubles(0, 16, -4.0, -0.1), random_doubles(1, 16, -4.0, -0.1)
    losses = dpo.simpo_loss(chosen, rejected, beta, gamma)
    assert losses.shape == (16,) and losses.dtype == torch.float64
    for i in range(16):
        margin = beta * (chosen[i].item() - rejected[i].item()) - gamma
        expected = -math.log(1 / (1 + math.exp(-margin)))  # L = -log sigma(beta (avg_w - avg_l) - gamma)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_simpo_gradient_is_minus_and_plus_beta_times_one_minus_sigma_of_the_margin():
    """dL/d avg_w = -beta (1 - sigma(m)) and dL/d avg_l = +beta (1 - sigma(m)), m = beta (avg_w - avg_l) - gamma."""
    beta, gamma = 2.0, 0.5
    chosen = random_doubles(2, 12, -3.0, -0.1).requires_grad_(True)
    rejected = random_doubles(3, 12, -3.0, -0.1).requires_grad_(True)
    dpo.simpo_loss(chosen, rejected, beta, gamma).sum().backward()
    for i in range(12):
        m = beta * (chosen[i].item() - rejected[i].item()) - gamma
        assert chosen.grad[i].item() == pytest.approx(-beta * (1 - sigmoid(m)), rel=1e-10)
        assert rejected.grad[i].item() == pytest.approx(beta * (1 - sigmoid(m)), rel=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_simpo_loss_is_ln_one_plus_e_gamma_at_equal_averages(gamma):
    averages = random_doubles(4, 6, -5.0, -0.01)
    for beta in (2.0, 2.5):
        losses = dpo.simpo_loss(averages, averages.clone(), beta, gamma)
        for loss in losses.tolist():
            assert loss == pytest.approx(math.log(1 + math.exp(gamma)), rel=1e-12)


def test_simpo_loss_is_finite_at_extreme_margins():
    beta, gamma = 2.5, 0.5
    chosen = torch.tensor([-1e-3, -5e3, -1e4, -80.0], requires_grad=True)  # float32
    rejected = torch.tensor([-1e4, -1e-3, -1e-6, -1e4], requires_grad=True)
    losses = dpo.simpo_loss(chosen, rejected, beta, gamma)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    for i in range(4):
        margin = beta * (chosen[i].item() - rejected[i].item()) - gamma
        assert losses[i].item() == pytest.approx(-log_sigmoid(margin), rel=1e-6, abs=1e-30)
    assert losses[1].item() == pytest.approx(-beta * (chosen[1].item() - rejected[1].item()) + gamma, rel=1e-6)  # linear
    assert losses[0].item() >= 0 and chosen.grad[0].item() <= 0  # saturated, never negative


# ---------------------------------------------------------------------------- 3. ORPO
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_equals_its_formula_by_loops_in_float64(lam):
    chosen, rejected = random_doubles(5, 16, -6.0, -0.01), random_doubles(6, 16, -6.0, -0.01)
    losses = dpo.orpo_loss(chosen, rejected, lam)
    assert losses.shape == (16,) and losses.dtype == torch.float64
    for i in range(16):
        a_w, a_l = chosen[i].item(), rejected[i].item()
        odds_w, odds_l = math.exp(a_w) / (1 - math.exp(a_w)), math.exp(a_l) / (1 - math.exp(a_l))  # p / (1 - p)
        ratio = odds_w / odds_l
        expected = -a_w - lam * math.log(ratio / (1 + ratio))  # -log sigma(log OR) = -log(OR / (1 + OR))
        assert losses[i].item() == pytest.approx(expected, rel=1e-10)


def test_orpo_gradient_matches_hand_derivation():
    """With d = log_odds(a_w) - log_odds(a_l) and d/da log_odds(a) = 1 / (1 - e^a):
    dL/da_w = -1 - lam (1 - sigma(d)) / (1 - e^a_w) and dL/da_l = lam (1 - sigma(d)) / (1 - e^a_l)."""
    lam = 0.5
    chosen = random_doubles(7, 12, -4.0, -0.05).requires_grad_(True)
    rejected = random_doubles(8, 12, -4.0, -0.05).requires_grad_(True)
    dpo.orpo_loss(chosen, rejected, lam).sum().backward()
    for i in range(12):
        a_w, a_l = chosen[i].item(), rejected[i].item()
        d = log_odds(a_w) - log_odds(a_l)
        assert chosen.grad[i].item() == pytest.approx(-1 - lam * (1 - sigmoid(d)) / (1 - math.exp(a_w)), rel=1e-9)
        assert rejected.grad[i].item() == pytest.approx(lam * (1 - sigmoid(d)) / (1 - math.exp(a_l)), rel=1e-9)


NEAR_ZERO = [-1e-6, -1e-7, -1e-20, -1e-30]
ORDINARY = [-0.7, -3.0]


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_is_finite_and_accurate_near_zero_in_float32(lam):
    """Average log-probs this close to 0 are where 1 - exp(a) loses every digit in float32 (and is 0 below
    -3e-8): the loss and its gradient stay finite and match a float64 reference computed from the same
    float32 inputs with log(-expm1(a))."""
    values = NEAR_ZERO + ORDINARY
    pairs = [(w, l) for w in values for l in values]
    chosen = torch.tensor([w for w, _ in pairs], dtype=torch.float32, requires_grad=True)
    rejected = torch.tensor([l for _, l in pairs], dtype=torch.float32, requires_grad=True)
    losses = dpo.orpo_loss(chosen, rejected, lam)
    losses.sum().backward()
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    for i in range(len(pairs)):
        a_w, a_l = chosen[i].item(), rejected[i].item()  # the float32 values, exactly, in float64
        expected = -a_w - lam * log_sigmoid(log_odds(a_w) - log_odds(a_l))
        assert losses[i].item() == pytest.approx(expected, rel=2e-5, abs=1e-36), (a_w, a_l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_at_an_average_of_exactly_zero_uses_the_smallest_normal_number(dtype):
    """a = 0 (every token certain) has infinite odds; the loss treats it as -tiny, the dtype's smallest normal
    number, so it stays finite; no gradient flows through those odds, while the NLL term keeps its -1."""
    lam = 0.2
    tiny = torch.finfo(dtype).tiny
    chosen = torch.tensor([0.0, 0.0, -0.5, -1e-7], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([0.0, -1.0, 0.0, 0.0], dtype=dtype, requires_grad=True)
    losses = dpo.orpo_loss(chosen, rejected, lam)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    for i in range(4):
        a_w, a_l = chosen[i].item(), rejected[i].item()
        expected = -a_w - lam * log_sigmoid(log_odds(min(a_w, -tiny)) - log_odds(min(a_l, -tiny)))
        assert losses[i].item() == pytest.approx(expected, rel=2e-5), (a_w, a_l)
    assert chosen.grad[0].item() == chosen.grad[1].item() == -1.0  # the NLL alone
    assert rejected.grad[0].item() == rejected.grad[2].item() == rejected.grad[3].item() == 0.0
    assert losses[2].item() > 80 * lam  # a certain rejected response is a large, finite penalty


def test_orpo_with_lambda_zero_is_the_mean_nll_of_the_chosen_response():
    logits, tokens, response_mask, _ = gather_case(seed=3, dtype=torch.float64)
    chosen_avg = sequence_logps(logits[:2], tokens[:2], response_mask[:2], average=True)
    rejected_avg = sequence_logps(logits[2:], tokens[2:], response_mask[2:], average=True)
    losses = dpo.orpo_loss(chosen_avg, rejected_avg, lam=0.0)
    brute = brute_response_logps(logits[:2], tokens[:2], response_mask[:2])
    expected = torch.tensor([-total / count for total, count in brute], dtype=torch.float64)  # mean NLL per token
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dpo.orpo_loss(chosen_avg, rejected_avg - 3.0, lam=0.0), expected, rtol=1e-12, atol=1e-12)
    assert (dpo.orpo_loss(chosen_avg, rejected_avg, lam=0.1) > losses).all()  # the odds term is a positive penalty


# ---------------------------------------------------------------------------- 4. KTO
DESIRABLE = [True, False, True, True, False, False, True, False, True, False]


def kto_by_loop(policy, reference, desirable, z, beta, w_d, w_u):
    out = []
    for p, r, d in zip(policy.tolist(), reference.tolist(), desirable):
        reward = p - r
        out.append(w_d * (1 - sigmoid(beta * (reward - z))) if d else w_u * (1 - sigmoid(beta * (z - reward))))
    return out


@pytest.mark.parametrize("beta,w_d,w_u", [(0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (1.0, 1.0, 2.5)])
def test_kto_loss_equals_its_formula_by_loops_for_mixed_rows_and_weights(beta, w_d, w_u):
    policy, reference = random_doubles(9, 10, -60.0, -20.0), random_doubles(10, 10, -60.0, -20.0)
    kl = torch.tensor(0.7, dtype=torch.float64)
    losses = dpo.kto_loss(policy, reference, torch.tensor(DESIRABLE), kl, beta, w_d, w_u)
    assert losses.shape == (10,) and losses.dtype == torch.float64
    expected = kto_by_loop(policy, reference, DESIRABLE, 0.7, beta, w_d, w_u)
    for got, want in zip(losses.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-10)


def test_kto_kl_gets_no_gradient_while_policy_logps_does():
    beta, w_d, w_u = 0.5, 1.2, 0.8
    policy = random_doubles(11, 10, -30.0, -10.0).requires_grad_(True)
    reference = random_doubles(12, 10, -30.0, -10.0)
    kl = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    dpo.kto_loss(policy, reference, torch.tensor(DESIRABLE), kl, beta, w_d, w_u).sum().backward()
    assert kl.grad is None or kl.grad.item() == 0.0
    for i, desirable in enumerate(DESIRABLE):
        reward = policy[i].item() - reference[i].item()
        if desirable:  # d/dr w_D (1 - sigma(beta (r - z))) = -w_D beta sigma'(beta (r - z))
            s = sigmoid(beta * (reward - 0.9))
            expected = -w_d * beta * s * (1 - s)
        else:  # d/dr w_U (1 - sigma(beta (z - r))) = +w_U beta sigma'(beta (z - r))
            s = sigmoid(beta * (0.9 - reward))
            expected = w_u * beta * s * (1 - s)
        assert policy.grad[i].item() == pytest.approx(expected, rel=1e-9)
        assert policy.grad[i].item() != 0.0


def test_kto_treats_a_negative_kl_as_zero():
    beta = 0.5
    policy, reference = random_doubles(13, 10, -30.0, -10.0), random_doubles(14, 10, -30.0, -10.0)
    desirable = torch.tensor(DESIRABLE)
    losses = dpo.kto_loss(policy, reference, desirable, torch.tensor(-0.8, dtype=torch.float64), beta)
    expected = kto_by_loop(policy, reference, DESIRABLE, 0.0, beta, 1.0, 1.0)
    shifted = kto_by_loop(policy, reference, DESIRABLE, -0.8, beta, 1.0, 1.0)  # what z = kl would give
    assert max(abs(a - b) for a, b in zip(expected, shifted)) > 1e-3
    for got, want in zip(losses.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("w_d,w_u", [(1.0, 1.0), (1.33, 0.75)])
def test_kto_loss_is_half_the_weight_when_policy_equals_reference_and_kl_is_zero(w_d, w_u):
    logps = random_doubles(15, 10, -40.0, -5.0)
    losses = dpo.kto_loss(logps, logps.clone(), torch.tensor(DESIRABLE), torch.tensor(0.0, dtype=torch.float64), 0.1, w_d, w_u)
    for loss, desirable in zip(losses.tolist(), DESIRABLE):
        assert loss == (w_d if desirable else w_u) * 0.5


# ---------------------------------------------------------------------------- the losses inside a DPO step
def one_step_loss(loss_type, policy, reference, pairs, **settings):
    """The loss dpo.dpo_step reports for one micro-batch of these pairs (it also takes the step; the
    loss is of the weights before it)."""
    cfg = dpo.DPOConfig(loss_type=loss_type, micro_batch_size=len(pairs), batch_size=len(pairs), lr=1e-9, **settings)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-9)
    return dpo.dpo_step(policy, optimizer, [(pairs, None)], reference, cfg, max_length=32, lr=1e-9, step=0)["loss"]


def unpadded_logp(model, prompt, response):
    """log pi(response + EOT | prompt) of one sequence run alone, float64, by a loop over its tokens."""
    seq = prompt + response + [dpo.EOT]
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0].double().tolist()
    return sum(log_softmax_at(logits[t - 1], seq[t]) for t in range(len(prompt), len(seq)))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo", "kto", "ipo"])
def test_each_family_loss_in_a_dpo_step_equals_its_formula_on_sequences_run_alone(loss_type):
    """dpo_step's one padded forward over [chosen; rejected] (KTO: and the mismatched rows of its KL
    estimate) gives the loss the formula gives on each sequence's own float64 log-probs."""
    reference = tiny_gpt(seed=1).eval().requires_grad_(False)
    policy = tiny_gpt(seed=2)
    g = torch.Generator().manual_seed(3)
    pairs = [dpo.PreferencePair(torch.randint(0, 500, (int(n),), generator=g).tolist(),
                                torch.randint(0, 500, (int(a),), generator=g).tolist(),
                                torch.randint(0, 500, (int(b),), generator=g).tolist())
             for n, a, b in torch.randint(1, 7, (3, 3), generator=g)]
    settings = {"beta": 0.7, "gamma": 0.3, "lam": 0.4, "desirable_weight": 1.5, "undesirable_weight": 0.5}
    got = one_step_loss(loss_type, policy, reference, pairs, **settings)
    beta = settings["beta"]
    losses = []
    if loss_type == "kto":
        # z: mean log-ratio of each prompt with the NEXT pair's chosen and rejected responses, floored at 0
        nxt = pairs[1:] + pairs[:1]
        mismatched = [unpadded_logp(policy, p.prompt, getattr(q, side)) - unpadded_logp(reference, p.prompt, getattr(q, side))
                      for side in ("chosen", "rejected") for p, q in zip(pairs, nxt)]
        z = max(sum(mismatched) / len(mismatched), 0.0)
        for side, weight, sign in (("chosen", 1.5, 1), ("rejected", 0.5, -1)):
            for p in pairs:
                r = unpadded_logp(policy, p.prompt, getattr(p, side)) - unpadded_logp(reference, p.prompt, getattr(p, side))
                losses.append(weight * (1 - sigmoid(sign * beta * (r - z))))
    for p in pairs if loss_type != "kto" else []:
        w, l = (unpadded_logp(policy, p.prompt, y) for y in (p.chosen, p.rejected))
        avg_w, avg_l = w / (len(p.chosen) + 1), l / (len(p.rejected) + 1)  # + 1: the EOT each response ends with
        if loss_type == "simpo":
            losses.append(-log_sigmoid(beta * (avg_w - avg_l) - settings["gamma"]))
        elif loss_type == "orpo":
            losses.append(-avg_w - settings["lam"] * log_sigmoid(log_odds(avg_w) - log_odds(avg_l)))
        else:  # ipo: (d - 1 / (2 beta))^2, d the difference of the log-ratios
            d = (w - unpadded_logp(reference, p.prompt, p.chosen)) - (l - unpadded_logp(reference, p.prompt, p.rejected))
            losses.append((d - 1 / (2 * beta)) ** 2)
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_kto_refuses_a_micro_batch_of_one_and_a_precomputed_reference():
    for settings in ({"micro_batch_size": 1, "batch_size": 1}, {"precompute_ref": True}):
        with pytest.raises(ValueError, match="kto needs"):
            dpo.DPOConfig(loss_type="kto", **settings).validate()
