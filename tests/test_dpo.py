"""
Tests of the DPO core (dpo.py) against the claims of Rafailov et al. 2023.

Every expected value is computed independently of the code under test: brute-force Python loops over
positions in float64, hand-written formulas with math.log / math.exp, per-sequence autograd in float64,
the closed-form optimum pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, or a synthetic reward on a toy task.
"""
import copy
import json
import math
import os
import random

import pytest
import torch

import dpo
import preferences
import logprobs
import sample
from checkpoint import load_checkpoint, load_model, read_jsonl
from cli import UserError
from conftest import NoTruthValue, brute_response_logps, gather_case, save_tiny_checkpoint, tiny_gpt
from data import get_encoding
from dpo import EOT, DPOConfig, PreferencePair

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- independent helpers
def sequence_logps(logits, tokens, response_mask):
    """logprobs.sequence_logps of full logits (B, T, V), as the evaluator takes it."""
    return logprobs.sequence_logps(logprobs.token_logps(logits, tokens), response_mask[:, 1:].bool())


def brute_sequence_logps(logits, tokens, response_mask):
    """Per row: sum over t >= 1 with response_mask[t] of log_softmax(logits[t - 1])[tokens[t]], Python loops."""
    return [total for total, _ in brute_response_logps(logits, tokens, response_mask)]


def log_sigmoid(z):
    """log(1 / (1 + exp(-z))), written so neither branch overflows."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z):
    return math.exp(log_sigmoid(z))


def response_logp(model, prompt, response):
    """log pi(response | prompt) of one unpadded sequence, in the model's dtype (float64 where used):
    sum over the response positions of log_softmax(logits[t - 1])[token t]."""
    seq = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(seq)[0].double(), dim=-1)  # (T, V)
    return sum(logps[t - 1, seq[0, t]] for t in range(len(prompt), len(prompt) + len(response)))


def random_pairs(rng, n, vocab=1000, prompt_len=(1, 6), response_len=(1, 8)):
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
        chosen = [rng.randrange(vocab) for _ in range(rng.randint(*response_len))]
        rejected = [rng.randrange(vocab) for _ in range(rng.randint(*response_len))]
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# ---------------------------------------------------------------------------- 1. the per-token gather
def test_response_token_logps_run_the_head_only_where_a_response_token_is_predicted():
    """The LM head at the predicting positions only gives each response token's log-prob as a float64
    loop over the full logits does, 0 elsewhere, and the same gradient as the full head."""
    model = tiny_gpt(vocab_size=97)
    _, tokens, response_mask, spans = gather_case(V=97)
    got = logprobs.response_token_logps(model, tokens, response_mask)  # (B, T-1)
    logits = model(tokens)
    for (total, count), row, (start, end) in zip(brute_response_logps(logits, tokens, response_mask), got, spans):
        assert row.sum().item() == pytest.approx(total, abs=1e-4) and count == end - start
        assert (row[:start - 1] == 0).all() and (row[end - 1:] == 0).all() and (row[start - 1:end - 1] != 0).all()
    got.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    torch.where(response_mask[:, 1:], logprobs.token_logps(model(tokens), tokens), 0.0).sum().backward()
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-6), k
    only = torch.zeros_like(response_mask)
    only[1, 3] = only[2, 0] = True  # the positions' logits, in row-major order
    torch.testing.assert_close(model(tokens, positions=only), torch.stack([logits[1, 3], logits[2, 0]]))


def test_kto_logps_mismatched_rows_keep_their_values_and_pass_no_gradient():
    """KTO's rows [chosen; mismatched; rejected; mismatched]: the same log-probs as one pass, and the
    gradient of the matched rows alone."""
    model = tiny_gpt(vocab_size=97)
    _, tokens, response_mask, _ = gather_case(V=97)
    rows = torch.tensor([False, True, False, True])  # one row of each kind
    got = dpo.kto_logps(model, tokens, response_mask)
    full = logprobs.response_token_logps(model, tokens, response_mask)
    torch.testing.assert_close(got, full.detach())
    got.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    full[~rows].sum().backward()
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-6), k


def test_sequence_logps_equals_brute_force_loop_in_float64():
    logits, tokens, response_mask, _ = gather_case()
    got = sequence_logps(logits, tokens, response_mask)
    assert got.shape == (4,)
    assert got.dtype in (torch.float32, torch.float64)
    expected = brute_sequence_logps(logits, tokens, response_mask)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_prompt_and_padding_never_count():
    logits, tokens, response_mask, spans = gather_case(seed=1)
    expected = brute_sequence_logps(logits, tokens, response_mask)
    g = torch.Generator().manual_seed(7)
    changed_logits, changed_tokens = logits.clone(), tokens.clone()
    for b, (start, end) in enumerate(spans):
        # only logits rows start-1 .. end-2 predict response tokens; everything else is prompt or padding
        used_rows = set(range(start - 1, end - 1))
        for t in range(logits.size(1)):
            if t not in used_rows:
                changed_logits[b, t] = torch.randn(logits.size(2), generator=g) * 1e3
        changed_tokens[b, :start] = torch.randint(0, logits.size(2), (start,), generator=g)  # prompt tokens
        changed_tokens[b, end:] = torch.randint(0, logits.size(2), (logits.size(1) - end,), generator=g)  # padding
    got = sequence_logps(changed_logits, changed_tokens, response_mask)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # the first token has no prediction, so it never counts even if marked
    marked_first = response_mask.clone()
    marked_first[:, 0] = True
    got = sequence_logps(logits, tokens, marked_first)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_appending_masked_padding_changes_nothing():
    logits, tokens, response_mask, _ = gather_case(seed=2)
    base = sequence_logps(logits, tokens, response_mask)
    g = torch.Generator().manual_seed(3)
    B, T, V = logits.shape
    longer_logits = torch.cat([logits, torch.randn(B, 5, V, generator=g) * 50], dim=1)
    longer_tokens = torch.cat([tokens, torch.randint(0, V, (B, 5), generator=g)], dim=1)
    longer_mask = torch.cat([response_mask, torch.zeros(B, 5, dtype=torch.bool)], dim=1)
    longer = sequence_logps(longer_logits, longer_tokens, longer_mask)
    torch.testing.assert_close(longer, base, rtol=0, atol=1e-6)
    expected = brute_sequence_logps(logits, tokens, response_mask)
    torch.testing.assert_close(longer.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_bf16_logits_give_float32_result_close_to_float64_loop():
    # long rows and a wide vocabulary, so a log-softmax computed in bf16 (error ~1e-2 per token) would show
    logits, tokens, response_mask, _ = gather_case(seed=4, B=3, T=40, V=2000, dtype=torch.bfloat16)
    got = sequence_logps(logits, tokens, response_mask)
    assert got.dtype in (torch.float32, torch.float64)
    expected = brute_sequence_logps(logits, tokens, response_mask)  # the bf16 values, exactly, in float64
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=2e-4)


# ---------------------------------------------------------------------------- 2. preference data
def test_collate_rows_are_chosen_then_rejected_prompt_response_eot_right_padded():
    pairs = [PreferencePair([11, 12, 13], [21, 22], [31, 32, 33, 34]),
             PreferencePair([41], [51, 52, 53, 54, 55], [61]),
             PreferencePair([71, 72], [81], [91, 92])]
    tokens, response_mask = dpo.collate(pairs, max_length=32)
    expected_rows = [p.prompt + p.chosen + [EOT] for p in pairs] + [p.prompt + p.rejected + [EOT] for p in pairs]
    expected_spans = [(len(p.prompt), len(p.prompt) + len(p.chosen) + 1) for p in pairs] + \
                     [(len(p.prompt), len(p.prompt) + len(p.rejected) + 1) for p in pairs]
    width = max(len(r) for r in expected_rows)
    assert tokens.shape == response_mask.shape == (6, width)
    for i, (row, (start, end)) in enumerate(zip(expected_rows, expected_spans)):
        assert tokens[i, :len(row)].tolist() == row
        mask_row = response_mask[i].tolist()
        for t in range(width):
            assert bool(mask_row[t]) == (start <= t < end), (i, t)  # response + EOT only; never prompt or padding
        assert tokens[i, end - 1] == EOT and mask_row[end - 1]


def test_collate_keeps_prompt_whole_and_cuts_long_response_keeping_eot():
    prompt, long_response, short = list(range(100, 105)), list(range(200, 250)), [300, 301]
    max_length = 16
    tokens, response_mask = dpo.collate([PreferencePair(prompt, long_response, short)], max_length=max_length)
    room = max_length - len(prompt) - 1
    chosen_row = prompt + long_response[:room] + [EOT]
    assert len(chosen_row) == max_length and tokens.shape[1] == max_length
    assert tokens[0].tolist() == chosen_row
    assert response_mask[0].tolist() == [False] * len(prompt) + [True] * (room + 1)
    rejected_row = prompt + short + [EOT]
    assert tokens[1, :len(rejected_row)].tolist() == rejected_row
    assert response_mask[1].tolist() == [False] * 5 + [True] * 3 + [False] * (max_length - 8)


def test_collate_without_eot_leaves_responses_as_they_are():
    prompt, long_response, short = [1, 2, 3], list(range(10, 30)), [40, 41]
    tokens, response_mask = dpo.collate([PreferencePair(prompt, long_response, short)], max_length=8, append_eot=False)
    assert tokens.shape == (2, 8)
    assert tokens[0].tolist() == prompt + long_response[:5]
    assert response_mask[0].tolist() == [False] * 3 + [True] * 5
    assert tokens[1].tolist() == prompt + short + [0] * 3
    assert response_mask[1].tolist() == [False] * 3 + [True] * 2 + [False] * 3


def test_read_pairs_tokenizes_prompt_and_response_separately(tmp_path):
    enc = get_encoding()
    prompt, chosen, rejected = "I think ", "it was great", "itself"
    # the boundary matters: BPE of the concatenation differs from the concatenation of BPEs
    assert enc.encode_ordinary(prompt + chosen) != enc.encode_ordinary(prompt) + enc.encode_ordinary(chosen)
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    (pair,) = dpo.read_pairs(str(path), max_length=64)
    assert pair.prompt == enc.encode_ordinary(prompt)
    assert pair.chosen == enc.encode_ordinary(chosen)
    assert pair.rejected == enc.encode_ordinary(rejected)


def test_ids_fields_take_precedence_over_text(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": "Hello", "chosen": "a", "rejected": "b",
                        "prompt_ids": [5, 6], "chosen_ids": [7, EOT], "rejected_ids": [9]},
                       {"prompt": "Hello", "chosen_ids": [1, 2, 3], "rejected": " world"}])
    first, second = dpo.read_pairs(str(path), max_length=64)
    assert (first.prompt, first.chosen, first.rejected) == ([5, 6], [7, EOT], [9])
    enc = get_encoding()
    assert (second.prompt, second.chosen, second.rejected) == (enc.encode_ordinary("Hello"), [1, 2, 3], enc.encode_ordinary(" world"))


GOOD = {"prompt": "The film", "chosen": " was wonderful", "rejected": " was dull"}
BAD_LINES = [  # (line, words the message must contain)
    ('{"prompt": "x", "chosen": "y", ', ["json"]),
    (json.dumps({"prompt": "x", "chosen": "y"}), ["missing", "rejected"]),
    (json.dumps({"chosen": "y", "rejected": "z"}), ["missing", "prompt"]),
    (json.dumps({"prompt": "", "chosen": "y", "rejected": "z"}), ["prompt", "empty"]),
    (json.dumps({"prompt": "x", "chosen": "", "rejected": "z"}), ["chosen", "empty"]),
    (json.dumps({"prompt": "x", "chosen": "y", "rejected": ""}), ["rejected", "empty"]),
    (json.dumps({"prompt": "x", "chosen": " same", "rejected": " same"}), ["same"]),
    (json.dumps({"prompt": " word" * 40, "chosen": "y", "rejected": "z"}), ["prompt", "length"]),
]


@pytest.mark.parametrize("bad_line,words", BAD_LINES, ids=["malformed_json", "missing_rejected", "missing_prompt",
                                                           "empty_prompt", "empty_chosen", "empty_rejected",
                                                           "chosen_equals_rejected", "prompt_too_long"])
def test_bad_line_raises_user_error_with_path_line_and_problem(tmp_path, bad_line, words):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD, "", GOOD, bad_line, GOOD])  # the bad line is line 4 (blank lines still count)
    with pytest.raises(UserError) as info:
        dpo.read_pairs(str(path), max_length=32)
    message = str(info.value)
    assert str(path) in message and ":4" in message, message
    for word in words:
        assert word in message.lower(), message


def test_skip_bad_returns_only_the_good_pairs(tmp_path):
    enc = get_encoding()
    goods = [{"prompt": f"Prompt {i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(3)]
    lines = [goods[0]] + [b for b, _ in BAD_LINES[:4]] + [goods[1]] + [b for b, _ in BAD_LINES[4:]] + [goods[2]]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, lines)
    pairs = dpo.read_pairs(str(path), max_length=32, skip_bad=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (enc.encode_ordinary(g["prompt"]), enc.encode_ordinary(g["chosen"]), enc.encode_ordinary(g["rejected"])) for g in goods]


def test_a_line_far_longer_than_the_context_is_refused_by_its_size_before_it_is_tokenized(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD, {"prompt": "x", "chosen": " good" * 400_000, "rejected": " bad"}, GOOD])  # 2 MB
    encoded = []
    monkeypatch.setattr(preferences, "get_encoding", lambda: type("Counting", (), {"encode_ordinary": lambda self, text: encoded.append(
        len(text)) or get_encoding().encode_ordinary(text)})())
    with pytest.raises(UserError, match=f"{path}:2: the line is 2,000,0[0-9][0-9] bytes, more than 1,048,576"):
        dpo.read_pairs(str(path), max_length=32)
    assert max(encoded) < 100  # only the first line's short texts were tokenized


def test_a_line_that_is_not_utf8_is_a_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    latin1 = json.dumps({"prompt": "Caf\u00e9", "chosen": " good", "rejected": " bad"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), latin1, json.dumps(GOOD).encode()]) + b"\n")
    with pytest.raises(UserError) as info:
        dpo.read_pairs(str(path), max_length=32)
    message = str(info.value)
    assert f"{path}:2:" in message and "utf-8" in message.lower(), message
    assert len(dpo.read_pairs(str(path), max_length=32, skip_bad=True)) == 2


@pytest.mark.parametrize("kind", ["folder", "missing", "unreadable"])
def test_a_path_that_is_not_a_readable_file_raises_user_error_naming_it(tmp_path, kind):
    path = tmp_path / "pairs.jsonl"
    if kind == "folder":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        write_jsonl(path, [GOOD])
        path.chmod(0)
    with pytest.raises(UserError, match=str(path)):
        dpo.read_pairs(str(path), max_length=32)


# ---------------------------------------------------------------------------- 3. at initialisation
def test_loss_is_ln2_when_policy_equals_reference():
    policy = tiny_gpt()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pairs = random_pairs(random.Random(0), 5, vocab=50257, prompt_len=(1, 7), response_len=(1, 9))
    tokens, response_mask = dpo.collate(pairs, max_length=32)
    assert (~response_mask[:, -1]).any(), "the batch should hold right padding"
    policy_chosen, policy_rejected = dpo.concatenated_logps(policy, tokens, response_mask).sum(-1).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.concatenated_logps(reference, tokens, response_mask).sum(-1).chunk(2)
    for beta in (0.1, 0.5):
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
        assert losses.shape == (5,)
        for loss in losses.tolist():
            assert loss == pytest.approx(LN2, abs=1e-7)
        assert chosen_rewards.abs().max().item() == 0.0
        assert rejected_rewards.abs().max().item() == 0.0


# ---------------------------------------------------------------------------- 4. the gradient
def reference_and_perturbed_policy(noise_seed):
    """A float64 tiny GPT as frozen reference, and a policy that is it plus N(0, 0.3^2) noise on every weight."""
    reference = tiny_gpt(seed=1).double().eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return reference, policy


def test_gradient_matches_paper_form():
    """grad L = -beta E[sigma(r_l - r_w) (grad log pi(y_w|x) - grad log pi(y_l|x))], r = beta log(pi / pi_ref)."""
    beta = 0.5
    reference, policy = reference_and_perturbed_policy(noise_seed=2)
    pairs = random_pairs(random.Random(1), 3, vocab=50257, prompt_len=(1, 5), response_len=(1, 6))

    # the code: one concatenated, right-padded forward pass and autograd through the DPO loss
    tokens, response_mask = dpo.collate(pairs, max_length=32)
    policy_chosen, policy_rejected = dpo.concatenated_logps(policy, tokens, response_mask).sum(-1).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.concatenated_logps(reference, tokens, response_mask).sum(-1).chunk(2)
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    params = list(policy.parameters())
    got = torch.autograd.grad(losses.mean(), params)

    # the paper's form, each sequence alone (no padding), in float64
    expected = [torch.zeros_like(p) for p in params]
    margins = []
    for pair in pairs:
        chosen, rejected = pair.chosen + [EOT], pair.rejected + [EOT]
        logp_w, logp_l = response_logp(policy, pair.prompt, chosen), response_logp(policy, pair.prompt, rejected)
        grad_w = torch.autograd.grad(logp_w, params)
        grad_l = torch.autograd.grad(logp_l, params)
        with torch.no_grad():
            r_w = beta * (logp_w.item() - response_logp(reference, pair.prompt, chosen).item())
            r_l = beta * (logp_l.item() - response_logp(reference, pair.prompt, rejected).item())
        margins.append(r_w - r_l)
        weight = -beta * sigmoid(r_l - r_w) / len(pairs)
        for e, gw, gl in zip(expected, grad_w, grad_l):
            e += weight * (gw - gl)
    assert max(abs(m) for m in margins) > 0.05, "the perturbed policy should differ from the reference"
    flat_got, flat_expected = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in expected])
    assert flat_expected.norm() > 0
    assert (flat_got.double() - flat_expected).norm() <= 1e-5 * flat_expected.norm()


@pytest.mark.parametrize("wrapped", [False, True], ids=["model", "compiled-like wrapper"])
def test_dpo_step_takes_the_gradient_of_the_mean_loss_over_its_micro_batches(wrapped):
    """dpo.dpo_step over two micro-batches of 2 pairs moves the weights (plain SGD, lr 1) by minus the
    gradient of the mean Eq. 7 loss over all 4 pairs, each pair's loss computed alone in float64; its
    metrics are the means over the 4 pairs, and the gradients are cleared for the next step."""
    beta = 0.5
    reference, policy = reference_and_perturbed_policy(noise_seed=3)
    pairs = random_pairs(random.Random(4), 4, vocab=50257, prompt_len=(1, 5), response_len=(1, 6))
    params = list(policy.parameters())

    margins, losses = [], []
    for pair in pairs:
        chosen, rejected = pair.chosen + [EOT], pair.rejected + [EOT]
        r_w = beta * (response_logp(policy, pair.prompt, chosen) - response_logp(reference, pair.prompt, chosen))
        r_l = beta * (response_logp(policy, pair.prompt, rejected) - response_logp(reference, pair.prompt, rejected))
        margins.append((r_w - r_l).item())
        losses.append(-torch.nn.functional.logsigmoid(r_w - r_l))
    mean_loss = sum(losses) / len(losses)
    expected_step = [-grad for grad in torch.autograd.grad(mean_loss, params)]

    before = [p.detach().clone() for p in params]
    metrics = dpo.dpo_step(policy, torch.optim.SGD(params, lr=1.0), [(pairs[:2], None), (pairs[2:], None)], reference,
                           DPOConfig(beta=beta, grad_clip=0.0), max_length=32, lr=1.0, step=0,
                           forward=NoTruthValue(policy) if wrapped else None)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    expected = torch.cat([e.flatten() for e in expected_step])
    assert expected.norm() > 0
    assert (moved - expected).norm() <= 1e-9 * expected.norm()
    assert metrics["loss"] == pytest.approx(mean_loss.item(), rel=1e-9)
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / 4, rel=1e-9)
    assert metrics["rewards/accuracies"] == sum(m > 0 for m in margins) / 4
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------- 5. Z(x) cancels (Eq. 6)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_partition_function_cancels(loss_type):
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    c = torch.randn(8, generator=g, dtype=torch.float64) * 10  # a different c(x) for every prompt
    for beta in (0.1, 0.7):
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type)
        shifted, shifted_chosen, shifted_rejected = dpo.dpo_loss(pc + c / beta, pr + c / beta, rc, rr, beta, loss_type=loss_type)
        torch.testing.assert_close(shifted, losses, rtol=1e-10, atol=1e-10)
        # the rewards themselves move by c(x): only their difference is identified
        torch.testing.assert_close(shifted_chosen, chosen_rewards + c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(shifted_rejected, rejected_rewards + c, rtol=1e-10, atol=1e-10)
        for i in range(8):
            d = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
            expected = {"sigmoid": -log_sigmoid(beta * d), "ipo": (d - 1 / (2 * beta)) ** 2,
                        "hinge": max(0.0, 1 - beta * d)}[loss_type]
            assert shifted[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------------------- 6. the closed-form optimum (Eq. 4)
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_dpo_optimum_is_gibbs_policy_on_bandit(beta):
    """One prompt, K responses, exact Bradley-Terry preferences: the minimiser of the population DPO loss
    is pi*(y) = pi_ref(y) exp(r(y) / beta) / Z."""
    K = 5
    g = torch.Generator().manual_seed(11)
    ref_logp = torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0)
    r = torch.randn(K, generator=g, dtype=torch.float64) * 1.5
    chosen_idx, rejected_idx = zip(*[(i, j) for i in range(K) for j in range(K) if i != j])
    chosen_idx, rejected_idx = torch.tensor(chosen_idx), torch.tensor(rejected_idx)
    p_prefer = torch.sigmoid(r[chosen_idx] - r[rejected_idx])  # Bradley-Terry p(i > j)
    theta = torch.nn.Parameter(torch.zeros(K, dtype=torch.float64))

    def population_loss():
        logp = torch.log_softmax(theta, 0)
        losses, _, _ = dpo.dpo_loss(logp[chosen_idx], logp[rejected_idx], ref_logp[chosen_idx], ref_logp[rejected_idx], beta)
        return (p_prefer * losses).sum() / len(chosen_idx)  # uniform weight over ordered pairs

    optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = population_loss()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    pi = torch.softmax(theta.detach(), 0)
    unnormalised = [math.exp(ref_logp[y].item() + r[y].item() / beta) for y in range(K)]
    pi_star = [u / sum(unnormalised) for u in unnormalised]
    assert max(abs(a - b) for a, b in zip(pi.tolist(), pi_star)) < 1e-4, (pi.tolist(), pi_star)
    assert max(pi_star) - min(pi_star) > 0.1  # the optimum is far from where the search starts


# ---------------------------------------------------------------------------- 7. the loss family
@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_formula(beta, label_smoothing):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 4 for _ in range(4))
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=label_smoothing)
    for i in range(16):
        d = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - label_smoothing) * math.log(1 / (1 + math.exp(-beta * d))) \
            - label_smoothing * math.log(1 / (1 + math.exp(beta * d)))
        assert losses[i].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12, abs=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_ipo_and_hinge_match_formulas(beta):
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 4 for _ in range(4))
    ipo, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    hinge, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta, loss_type="hinge")
    n_active = 0
    for i in range(16):
        d = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert ipo[i].item() == pytest.approx((d - 1 / (2 * beta)) ** 2, rel=1e-10, abs=1e-12)
        assert hinge[i].item() == pytest.approx(max(0.0, 1 - beta * d), rel=1e-10, abs=1e-12)
        n_active += 1 - beta * d > 0
    assert 0 < n_active < 16  # both sides of the hinge are exercised


def test_rewards_are_detached():
    pc, pr = torch.tensor([-3.0, -2.0], requires_grad=True), torch.tensor([-4.0, -1.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc, pr, torch.tensor([-3.5, -2.5]), torch.tensor([-3.0, -1.5]), 0.2)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_extreme_margins_stay_finite(dtype, loss_type, label_smoothing):
    for beta in (0.1, 1.0):
        d = torch.tensor([1e4, -1e4], dtype=dtype)
        pc = torch.zeros(2, dtype=dtype, requires_grad=True)
        losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(pc + d, torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype),
                                                                torch.zeros(2, dtype=dtype), beta, label_smoothing, loss_type)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
        assert torch.isfinite(chosen_rewards).all() and torch.isfinite(rejected_rewards).all()
        big = beta * 1e4
        expected = {"sigmoid": [label_smoothing * big, (1 - label_smoothing) * big],  # -log sigma(z) -> max(0, -z)
                    "ipo": [(1e4 - 1 / (2 * beta)) ** 2, (-1e4 - 1 / (2 * beta)) ** 2],
                    "hinge": [0.0, 1 + big]}[loss_type]
        assert losses[0].item() == pytest.approx(expected[0], rel=1e-6, abs=1e-30)
        assert losses[1].item() == pytest.approx(expected[1], rel=1e-6)
        if loss_type == "sigmoid":  # the gradient saturates at -beta * (1 - eps) or +beta * eps, never NaN
            assert pc.grad[0].item() == pytest.approx(-beta * -label_smoothing, abs=1e-6)
            assert pc.grad[1].item() == pytest.approx(-beta * (1 - label_smoothing), rel=1e-6)


# ---------------------------------------------------------------------------- 8. the trainer
TEXT_PAIRS = [  # short texts of different lengths: every token costs a 50257-wide softmax on the CPU
    {"prompt": "The movie", "chosen": " was great.", "rejected": " bad"},
    {"prompt": "Acting", "chosen": " superb", "rejected": " was wooden"},
    {"prompt": "Honestly,", "chosen": " a gem.", "rejected": " a mess"},
    {"prompt": "The plot", "chosen": " works", "rejected": " made no sense"},
    {"prompt": "Music", "chosen": " is lovely", "rejected": " grates"},
    {"prompt": "Overall", "chosen": " I loved it", "rejected": " skip it."},
]


@pytest.fixture(scope="module")
def trainer_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_trainer")
    sft, pairs = str(root / "sft.pt"), str(root / "pairs.jsonl")
    save_tiny_checkpoint(sft, tiny_gpt(seed=3))
    write_jsonl(pairs, TEXT_PAIRS)
    return root, sft, pairs


def trainer_config(sft, pairs, out, **overrides):
    values = dict(sft=sft, pairs=pairs, out=out, device="cpu", optimizer="adamw", lr=1e-3, warmup_steps=1, batch_size=4,
                  micro_batch_size=2, steps=5, log_interval=1, eval_interval=1000, save_interval=1000, beta=0.1)
    values.update(overrides)
    cfg = DPOConfig(**values)
    cfg.validate()
    return cfg


def logged_losses(out):
    return [(row["step"], row["loss"]) for row in read_jsonl(os.path.join(out, "dpo_log.jsonl")) if "loss" in row]


@pytest.fixture(scope="module")
def live_run(trainer_files):
    root, sft, pairs = trainer_files
    out = str(root / "live")
    dpo.train_dpo(trainer_config(sft, pairs, out, precompute_ref=False))
    return out


def test_precomputed_reference_gives_same_losses_as_live_reference(trainer_files, live_run):
    root, sft, pairs = trainer_files
    out = str(root / "precomputed")
    dpo.train_dpo(trainer_config(sft, pairs, out, precompute_ref=True))
    live, precomputed = logged_losses(live_run), logged_losses(out)
    assert [s for s, _ in live] == [s for s, _ in precomputed] == [1, 2, 3, 4, 5]
    assert live[0][1] == pytest.approx(LN2, abs=1e-6)  # policy == reference at the first step
    assert abs(live[-1][1] - LN2) > 1e-4, "training should move the loss away from ln 2"
    for (_, a), (_, b) in zip(live, precomputed):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_resumed_run_equals_uninterrupted_run(trainer_files, live_run):
    root, sft, pairs = trainer_files
    out = str(root / "resumed")
    dpo.train_dpo(trainer_config(sft, pairs, out, steps=3))
    dpo.train_dpo(trainer_config(sft, pairs, out, steps=5))
    assert [s for s, _ in logged_losses(out)] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(logged_losses(out), logged_losses(live_run)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    resumed = load_checkpoint(os.path.join(out, "dpo.pt"), kind="dpo")
    uninterrupted = load_checkpoint(os.path.join(live_run, "dpo.pt"), kind="dpo")
    assert resumed["step"] == uninterrupted["step"] == 5
    initial = torch.load(sft, weights_only=True)["model"]
    assert any(not torch.equal(initial[k], uninterrupted["model"][k]) for k in initial)
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-7, msg=name)


def test_resume_with_a_different_config_is_refused(trainer_files, live_run):
    _, sft, pairs = trainer_files
    with pytest.raises(UserError, match="beta"):
        dpo.train_dpo(trainer_config(sft, pairs, live_run, beta=0.2, steps=6))


# ---------------------------------------------------------------------------- 9. end to end on a toy task
TOY_VOCAB = list(range(10))  # a ten-token language; the reward is how often token 7 appears
REWARDED = 7


def toy_reward(response):
    return sum(1 for t in response if t == REWARDED)


def toy_sequence(rng, length):
    return [rng.choice(TOY_VOCAB) for _ in range(length)]


def toy_pairs(rng, n, length=4):
    pairs = []
    while len(pairs) < n:
        prompt, a, b = toy_sequence(rng, 1), toy_sequence(rng, length), toy_sequence(rng, length)
        if toy_reward(a) != toy_reward(b):
            chosen, rejected = (a, b) if toy_reward(a) > toy_reward(b) else (b, a)
            pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def toy_language_model():
    """A tiny GPT that already speaks the toy language (in place of SFT, which costs minutes on a CPU at
    a 50257-token vocabulary): feature 0 of the final hidden state is the constant 1 (LayerNorm weight 0,
    bias 1), and column 0 of the tied embedding puts the ten toy tokens at logit ~0, end-of-text at -4 and
    every other token at -15, so samples are nearly uniform over the toy tokens, a few words long."""
    model = tiny_gpt(block_size=16)
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
        wte = model.transformer.wte.weight  # tied to lm_head
        wte[:, 0] = -15.0
        wte[TOY_VOCAB, 0] = 0.0
        wte[EOT, 0] = -4.0
    return model.eval()


def mean_sample_reward(model, prompts, seed):
    generator = torch.Generator().manual_seed(seed)
    completions = sample.generate(model.eval(), prompts, max_new_tokens=6, generator=generator)
    return sum(toy_reward(c) for c in completions) / len(completions)


def implicit_reward_accuracy(policy, reference, pairs, beta):
    """Fraction of pairs where beta * log(pi / pi_ref) ranks chosen above rejected, with a gather written here
    (all toy sequences have the same length, so one unpadded batch per model)."""
    sequences = torch.tensor([p.prompt + y + [EOT] for p in pairs for y in (p.chosen, p.rejected)])  # (2N, T)
    start = len(pairs[0].prompt)

    def logps(model):
        with torch.no_grad():
            token_logps = torch.log_softmax(model(sequences).double(), dim=-1)  # (2N, T, V)
        picked = token_logps[:, :-1].gather(-1, sequences[:, 1:, None])[..., 0]  # row t - 1 predicts token t
        return picked[:, start - 1:].sum(-1)  # the response and its end-of-text

    rewards = (beta * (logps(policy.eval()) - logps(reference.eval()))).view(len(pairs), 2)
    return (rewards[:, 0] > rewards[:, 1]).double().mean().item()


def test_dpo_raises_reward_of_samples_on_toy_task(tmp_path):
    reference = toy_language_model()
    sft = str(tmp_path / "sft.pt")
    save_tiny_checkpoint(sft, reference)
    rng = random.Random(1)
    train_pairs, held_out = toy_pairs(rng, 64), toy_pairs(rng, 32)
    beta = 0.1
    cfg = trainer_config(sft, str(tmp_path / "unused.jsonl"), str(tmp_path / "dpo"), beta=beta, lr=1e-2, batch_size=8,
                         micro_batch_size=8, steps=8, log_interval=4, precompute_ref=True)
    policy = load_model(dpo.train_dpo(cfg, pairs=train_pairs))

    prompt_rng = random.Random(2)
    prompts = [toy_sequence(prompt_rng, 1) for _ in range(96)]
    before, after = mean_sample_reward(reference, prompts, seed=3), mean_sample_reward(policy, prompts, seed=3)
    assert 0.2 < before < 1.0, f"the reference should write the toy language (reward {before})"
    assert after > before + 0.4, f"mean reward of samples: reference {before:.3f}, policy {after:.3f}"
    accuracy = implicit_reward_accuracy(policy, reference, held_out, beta)
    print(f"toy task: mean reward {before:.3f} -> {after:.3f}, held-out implicit-reward accuracy {accuracy:.3f}")
    assert accuracy >= 0.7, f"implicit-reward accuracy on held-out pairs {accuracy:.3f}"
