"""A head that scores only some GPT-2 tokens (--output-vocab): its logits, log-probs, samples and SFT
loss against the full head's, computed independently (float64, Python loops), and the refusals."""
import collections
import dataclasses

import pytest
import torch

import dpo
import sft
from checkpoint import load_model, save_checkpoint
from cli import UserError
from conftest import brute_response_logps, log_softmax_at, save_tiny_checkpoint, sharp_gpt
from evaluate import evaluate_policy
from logprobs import completion_token_logps, prompt_completion_rows, response_token_logps
from model import GPT
from preferences import PreferencePair
from sample import generate

V = 101


def restricted_copy(full, output_ids):
    """A GPT with full's weights whose head scores only output_ids (sorted GPT-2 ids)."""
    model = GPT(dataclasses.replace(full.config, output_vocab=len(output_ids)))
    model.load_state_dict({**full.state_dict(), "output_ids": torch.tensor(output_ids)})
    return model.to(next(full.parameters()).dtype).eval()


def some_ids(seed=0, k=30):
    return sorted(torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def test_a_restricted_head_gives_the_full_heads_logits_of_its_tokens_and_reads_every_token():
    full = sharp_gpt(vocab_size=V).double()
    ids = some_ids()
    model = restricted_copy(full, ids)
    x = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))  # inputs the head does not score too
    with torch.no_grad():
        assert model(x).shape == (3, 9, len(ids))
        torch.testing.assert_close(model(x), full(x)[..., ids], rtol=0, atol=1e-12)


def test_output_rows_and_output_tokens_map_ids_both_ways_and_mark_the_unscored():
    ids = some_ids(seed=2)
    model = restricted_copy(sharp_gpt(vocab_size=V), ids)
    row_of = {token: row for row, token in enumerate(ids)}
    every_id = torch.arange(V)
    assert model.output_rows(every_id).tolist() == [row_of.get(t, -1) for t in range(V)]
    assert model.output_tokens(torch.arange(len(ids))).tolist() == ids
    assert model.output_tokens(model.output_rows(torch.tensor(ids))).tolist() == ids
    full = sharp_gpt(vocab_size=V)
    assert torch.equal(full.output_rows(every_id), every_id) and torch.equal(full.output_tokens(every_id), every_id)


def test_log_probs_are_the_log_softmax_over_the_scored_tokens_only_and_minus_infinity_elsewhere():
    """Right-padded rows (DPO's) and left-padded rows (PPO's): each response token's log-prob against a
    Python float64 log-softmax over the full head's logits of the scored tokens."""
    full = sharp_gpt(vocab_size=V).double()
    ids = some_ids(seed=3)
    model = restricted_copy(full, ids)
    g = torch.Generator().manual_seed(4)
    tokens = torch.tensor(ids)[torch.randint(0, len(ids), (2, 10), generator=g)]
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:10], mask[1, 2:7] = True, True
    with torch.no_grad():
        got = response_token_logps(model, tokens, mask)
        full_logits = full(tokens)[..., ids]  # the scored columns: what the restricted head must normalise over
    row_of = {token: row for row, token in enumerate(ids)}
    expected = brute_response_logps(full_logits, torch.tensor([[row_of[t] for t in row] for row in tokens.tolist()]), mask)
    assert [pytest.approx(total, abs=1e-9) for total, _ in expected] == got.sum(-1).tolist()

    prompts, completions = [[5, 7], [9]], [tokens[0, :4].tolist(), tokens[1, :4].tolist()]
    left, left_mask, _ = prompt_completion_rows(prompts, completions, "cpu")
    with torch.no_grad():
        got = completion_token_logps(model, left, left_mask, 4)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            row_logits = full(torch.tensor([p + c]))[0, :, ids].tolist()
            for t, token in enumerate(c):
                assert got[b, t].item() == pytest.approx(log_softmax_at(row_logits[len(p) + t - 1], row_of[token]), abs=1e-9)

    unscored = next(t for t in range(V) if t not in row_of)
    tokens[0, 5] = unscored
    with torch.no_grad():
        logps = response_token_logps(model, tokens, mask)
    assert logps[0, 4].item() == float("-inf") and torch.isfinite(logps[1]).all()


def test_generation_never_emits_a_token_the_head_does_not_score():
    """The head scores the 10 tokens the full head likes least: every sampled token is one of them."""
    full = sharp_gpt(vocab_size=V)
    with torch.no_grad():
        least_liked = full(torch.tensor([[1, 2, 3]]))[0, -1].argsort()[:10]
    ids = sorted(least_liked.tolist())
    model = restricted_copy(full, ids)
    prompts = [[1, 2, 3], [4], [7, 8, 9, 10]] * 20
    completions = generate(model, prompts, 12, stop_at_eot=False, generator=torch.Generator().manual_seed(0))
    assert {t for c in completions for t in c} <= set(ids)
    assert len({t for c in completions for t in c}) > 1  # sampled, not stuck on one token


class Recorder:
    """A scorer that keeps what it was asked to score."""

    def __init__(self):
        self.seen = []

    def score(self, sequences):
        self.seen += [list(s) for s in sequences]
        return torch.zeros(len(sequences), dtype=torch.float64).numpy() + 0.5


class MaskedFullHead(GPT):
    """The full head with the unscored tokens' logits at -inf: what a restricted head is, in GPT-2's columns."""

    def head(self, features):
        logits = super().head(features)
        return logits.masked_fill(~self.scored, float("-inf"))


def test_the_reward_and_judge_score_the_gpt2_tokens_a_full_head_masked_to_the_same_tokens_samples():
    """The mapping is invisible outside the model: the evaluation's samples, what the reward and the
    judge are given, equal those of a full-vocabulary model whose other tokens' logits are -inf."""
    full = sharp_gpt(vocab_size=V).double()
    ids = some_ids(seed=5, k=40)
    model = restricted_copy(full, ids)
    masked = MaskedFullHead(full.config).double().eval()
    masked.load_state_dict(full.state_dict())
    masked.scored = torch.zeros(V, dtype=torch.bool)
    masked.scored[ids] = True
    prompts = [[3, 1], [4, 1, 5, 9], [2]] * 4
    seen = []
    for policy in (model, masked):
        reward, judge = Recorder(), Recorder()
        point, samples = evaluate_policy(policy, policy, reward, judge, prompts, 10, batch_size=5, seed=0)
        seen.append((reward.seen, judge.seen, [s["completion_ids"] for s in samples]))
    assert seen[0] == seen[1]
    assert seen[0][0] == seen[0][1] == [p + c for p, c in zip(prompts, seen[0][2])]
    assert {t for c in seen[0][2] for t in c} <= set(ids)


def test_sft_heads_score_the_most_frequent_tokens_of_the_training_text():
    stream = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    stream[:700] = 50256  # end-of-text, the most frequent
    counts = collections.Counter(stream.tolist())
    expected = sorted(sorted(counts, key=lambda t: (-counts[t], t))[:64])
    assert sft.most_frequent_tokens(stream, 64).tolist() == expected


def test_sft_loss_is_the_mean_cross_entropy_over_the_targets_the_head_scores():
    full = sharp_gpt(vocab_size=V).double()
    ids = some_ids(seed=6, k=50)
    model = restricted_copy(full, ids)
    windows = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss = sft.lm_loss(model, windows).item()
        logits = full(windows[:, :-1])[..., ids].tolist()
    row_of = {token: row for row, token in enumerate(ids)}
    terms = [-log_softmax_at(logits[b][t], row_of[int(windows[b, t + 1])])
             for b in range(3) for t in range(11) if int(windows[b, t + 1]) in row_of]
    assert 0 < len(terms) < 33
    assert loss == pytest.approx(sum(terms) / len(terms), abs=1e-5)  # lm_loss computes in float32


@pytest.mark.parametrize("damage", ["unsorted", "repeated", "beyond"])
def test_a_checkpoint_whose_output_ids_are_damaged_is_refused_in_one_line(tmp_path, damage):
    model = restricted_copy(sharp_gpt(vocab_size=V), some_ids())
    state = model.state_dict()
    ids = state["output_ids"].clone()
    if damage == "unsorted":
        ids[[0, 1]] = ids[[1, 0]]
    elif damage == "repeated":
        ids[1] = ids[0]
    else:
        ids[-1] = V
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, {"kind": "sft", "model": {**state, "output_ids": ids}, "model_config": dataclasses.asdict(model.config),
                           "config": {}, "step": 0})
    with pytest.raises(UserError, match="output_ids") as e:
        load_model(path)
    assert "\n" not in str(e.value)
    assert torch.equal(load_model(save_tiny_checkpoint(tmp_path / "ok.pt", model)).output_ids, state["output_ids"])


def test_dpo_refuses_pairs_whose_responses_hold_a_token_the_head_never_emits():
    ids = some_ids(seed=8)
    model = restricted_copy(sharp_gpt(vocab_size=V), ids)
    unscored = next(t for t in range(V) if t not in ids)
    good = PreferencePair([1, 2], ids[:3], ids[3:5])
    dpo.check_scored(model, [good, good], "out/sft.pt", append_eot=False)
    with pytest.raises(UserError, match=f"pair 1's rejected response holds token {unscored} .*out/sft.pt never emits"):
        dpo.check_scored(model, [good, PreferencePair([unscored], ids[:2], [ids[0], unscored])], "out/sft.pt", append_eot=False)
    with pytest.raises(UserError, match="pair 0's chosen response holds token 50256"):
        dpo.check_scored(restricted_copy(sharp_gpt(vocab_size=50257, n_embd=8, n_head=2), ids), [good], "sft.pt", append_eot=True)


def test_gpt2_weights_and_the_gpu_preset_keep_the_full_head(capsys):
    import train
    from cli import parse_config

    def sft_section(*flags):
        return train.sft_config(parse_config(train.TrainConfig, list(flags), presets=train.PRESETS))
    assert sft_section("--preset", "cpu").output_vocab == 8192
    assert sft_section("--preset", "cpu", "--init", "gpt2").output_vocab == 0  # GPT-2's own head, as published
    assert sft_section("--preset", "gpu").output_vocab == 0
    with pytest.raises(SystemExit):
        parse_config(sft.SFTConfig, ["--preset", "cpu", "--init", "gpt2"], presets=sft.PRESETS)
    assert "--output-vocab 8192 restricts a model trained from scratch; --init gpt2" in capsys.readouterr().err
