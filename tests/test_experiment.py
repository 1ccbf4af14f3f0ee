"""The IMDb experiment: the KL estimator, the pair builder, the reward model, and the whole
pipeline (smoke preset) including a kill between stages."""
import copy
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
import train
from checkpoint import load_state, read_jsonl
from conftest import save_tiny_checkpoint, tiny_gpt
from data import EOT, TokenizedSplit
from evaluate import evaluate_policy, sequence_kl, shown_kl
from pairs import all_pairs
from reward import RewardConfig, RewardModel, train_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def double_gpt(seed, vocab_size=3):
    return tiny_gpt(seed, vocab_size=vocab_size, block_size=8, n_embd=8).double().eval()


def test_sequence_kl_equals_brute_force_enumeration():
    """Sum over y of pi(y) * estimator(y) is the exact KL(pi || pi_ref) over all V^H continuations."""
    V, H, prompt = 3, 3, [1, 0]
    policy, reference = double_gpt(0), double_gpt(1)
    with torch.no_grad():
        for p in policy.parameters():  # sharpen the policy so the KL is far from zero
            p.mul_(3.0)
    sequences = torch.tensor([prompt + list(y) for y in itertools.product(range(V), repeat=H)])  # (V^H, 2+H)
    mask = torch.zeros_like(sequences)
    mask[:, len(prompt):] = 1
    with torch.no_grad():
        policy_logits, reference_logits = policy(sequences), reference(sequences)
        estimate = sequence_kl(policy_logits, reference_logits, mask).double()  # (V^H,)

    def seq_prob(logits, seq):  # brute force: product of next-token probabilities along the sequence
        p = 1.0
        for t in range(len(prompt), len(seq)):
            p *= torch.softmax(logits[t - 1], -1)[seq[t]].item()
        return p

    pi = [seq_prob(policy_logits[i], sequences[i].tolist()) for i in range(len(sequences))]
    ref = [seq_prob(reference_logits[i], sequences[i].tolist()) for i in range(len(sequences))]
    assert sum(pi) == pytest.approx(1.0, abs=1e-9)
    exact_kl = sum(p * math.log(p / r) for p, r in zip(pi, ref))
    expected_estimate = sum(p * e for p, e in zip(pi, estimate.tolist()))
    assert exact_kl > 0.05
    assert expected_estimate == pytest.approx(exact_kl, rel=1e-5)


def test_sequence_kl_ignores_prompt_and_padding_positions():
    policy, reference = double_gpt(0, vocab_size=5), double_gpt(1, vocab_size=5)
    tokens = torch.tensor([[1, 2, 3, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        pl, rl = policy(tokens), reference(tokens)
        kl = sequence_kl(pl, rl, mask)
        # by hand: the per-step KLs of the two distributions that produced tokens 2 and 3
        lp, lr = pl.log_softmax(-1), rl.log_softmax(-1)
        by_hand = sum((lp[0, t].exp() * (lp[0, t] - lr[0, t])).sum() for t in (1, 2))
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-5)  # the estimator works in float32


class FakeRewardModel(torch.nn.Module):
    def score(self, sequences):
        return np.array([float(np.mean([t % 2 for t in s])) for s in sequences])


def test_kl_is_exactly_zero_when_policy_equals_reference():
    policy = tiny_gpt().eval()
    prompts = [[10, 11], [12, 13, 14, 15], [16, 17, 18]]
    metrics, completions = evaluate_policy(policy, copy.deepcopy(policy), FakeRewardModel(), prompts, 6, 2, seed=0)
    assert metrics["kl"] == 0.0
    assert all(len(c) == 6 for c in completions)
    assert 0.0 <= metrics["reward"] <= 1.0


def test_kl_in_chunks_of_rows_equals_kl_in_one_pass(monkeypatch):
    """The KL is computed KL_ROWS sequences at a time to bound memory; the chunking changes no number."""
    policy, reference = tiny_gpt(seed=0).eval(), tiny_gpt(seed=1).eval()
    prompts = [[10 + i] * (1 + i % 3) for i in range(7)]
    whole, _ = evaluate_policy(policy, reference, FakeRewardModel(), prompts, 5, 8, seed=0)
    monkeypatch.setattr(evaluate, "KL_ROWS", 2)
    chunked, _ = evaluate_policy(policy, reference, FakeRewardModel(), prompts, 5, 8, seed=0)
    assert whole["kl"] > 0.01
    assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-6) and chunked["reward"] == whole["reward"]


def test_a_kl_that_rounds_to_zero_reads_zero_not_minus_zero():
    assert shown_kl(-3e-9, 2) == "0.00" and shown_kl(0.0, 3) == "0.000" and shown_kl(1.234, 2) == "1.23"


def test_pair_builder_gives_six_pairs_from_four_completions_chosen_higher():
    completions = [[1], [2], [3], [4]]
    rewards = [0.2, 0.9, 0.5, 0.1]
    pairs = all_pairs([7, 8], completions, rewards)
    assert len(pairs) == 6
    seen = {frozenset((tuple(p["chosen_ids"]), tuple(p["rejected_ids"]))) for p in pairs}
    assert seen == {frozenset(((a,), (b,))) for a, b in itertools.combinations(range(1, 5), 2)}
    for p in pairs:
        assert p["chosen_reward"] >= p["rejected_reward"]
        assert rewards[p["chosen_ids"][0] - 1] == p["chosen_reward"] and p["prompt_ids"] == [7, 8]


def test_reward_model_learns_a_separable_task_and_scores_are_probabilities(tmp_path):
    """Reviews with token 5 are positive, with token 6 negative; the classifier must learn it."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 2
        docs = [list(rng.integers(10, 40, size=int(rng.integers(6, 12)))) for _ in range(n)]
        for doc, label in zip(docs, labels):
            doc[int(rng.integers(0, len(doc)))] = 5 if label else 6
        offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])])
        tokens = np.array([t for d in docs for t in d + [EOT]], dtype=np.uint16)
        return TokenizedSplit(tokens, offsets, labels)

    imdb = {"train": split(2048), "test": split(128)}
    model = tiny_gpt(block_size=16)
    save_tiny_checkpoint(tmp_path / "sft.pt", model)
    cfg = RewardConfig(sft=str(tmp_path / "sft.pt"), out=str(tmp_path), max_len=16, min_len=12, batch_size=32,
                       max_steps=100, lr=2e-3, warmup_steps=5, test_reviews=0, log_interval=40, device="cpu")
    path, accuracy = train_reward(cfg, imdb)
    assert accuracy >= 0.9
    reward_model = RewardModel(model.config)
    load_state(reward_model, torch.load(path, weights_only=True)["model"], path)
    scores = reward_model.eval().score([imdb["test"].review(i).tolist() for i in range(20)])
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.mean((scores > 0.5) == (imdb["test"].labels[:20] == 1)) >= 0.9


def run_train(args, cwd, kill_when=None):
    """Run train.py; with kill_when (a path), SIGKILL it as soon as that file appears."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_when:
        deadline = time.time() + 400
        while not os.path.exists(kill_when) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_smoke_pipeline_writes_results_and_resumes_after_a_kill(tmp_path, tiny_imdb):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data", tiny_imdb, "--no-data-verify", "--out", str(out), "--device", "cpu"]
    code, log = run_train(args, tmp_path, kill_when=out / "pairs.jsonl")
    assert code == -signal.SIGKILL, log[-2000:]
    assert not (out / "results.jsonl").exists()
    code, log = run_train(args, tmp_path)
    assert code == 0, log[-3000:]
    for stage in ("sft", "reward", "pairs"):
        assert f"=== {stage}: done already" in log
    rows = read_jsonl(out / "results.jsonl")
    assert {r["method"] for r in rows} == {"SFT", "Preferred-FT", "DPO"}
    assert {r["beta"] for r in rows if r["method"] == "DPO"} == {0.1, 1.0}
    for r in rows:
        assert set(r) >= {"method", "beta", "step", "kl", "reward", "wall_time"}
        assert 0 <= r["reward"] <= 1 and r["kl"] >= -1e-6
    dpo_steps = sorted(r["step"] for r in rows if r["method"] == "DPO" and r["beta"] == 0.1)
    assert dpo_steps == [0, 3, 6]  # eval_interval 3 of the smoke preset, 6 steps
    assert next(r for r in rows if r["method"] == "SFT")["kl"] == 0.0
    assert (out / "frontier.png").stat().st_size > 10_000
    pairs = read_jsonl(out / "pairs.jsonl")
    prefixes = {tuple(p["prompt_ids"]) for p in pairs}
    assert len(prefixes) == 16  # no prefix lost
    assert len(pairs) == 6 * 16
    assert all(p["chosen_reward"] >= p["rejected_reward"] for p in pairs)
    times = json.load(open(out / "stage_times.json"))
    assert {"sft", "reward", "sft_point", "preferred_ft", "dpo_beta0.1", "dpo_beta1", "report"} <= set(times)  # pairs' time may die with the kill
    assert times["sft"]["sft_tok_per_s"] > 0 and times["dpo_beta0.1"]["dpo_pairs_per_s"] > 0
    assert times["preferred_ft"]["preferred_ft_tok_per_s"] > 0
    assert times["reward"]["reward_reviews_per_s"] > 0 and 0 <= times["reward"]["reward_test_accuracy"] <= 1
    samples = (out / "report.md").read_text().split("```\n")[1]  # the fenced block: the same prefixes before and after DPO
    before, after = samples.split("SFT\n", 1)[1].split("DPO beta=0.1\n")

    def prefixes(block):  # lines "[reward] prefix|completion"
        return [line.split("|")[0][len("[0.00] "):] for line in block.strip().splitlines()]
    assert len(prefixes(before)) == 5 and prefixes(before) == prefixes(after)

    # --methods picks methods: --force redoes only the chosen one, and the report shows only the chosen ones
    dpo_done = (out / "dpo_beta0.1" / "dpo.pt").stat().st_mtime_ns
    code, log = run_train(args + ["--stage", "methods", "--methods", "sft_point", "--force"], tmp_path)
    assert code == 0, log[-3000:]
    assert "eval SFT beta=None step 0" in log and "eval DPO" not in log
    assert (out / "dpo_beta0.1" / "dpo.pt").stat().st_mtime_ns == dpo_done
    code, log = run_train(args + ["--stage", "report", "--methods", "dpo"], tmp_path)
    assert code == 0, log[-3000:]
    assert {row["method"] for row in read_jsonl(out / "results.jsonl")} == {"DPO"}


def test_every_setting_is_recorded_by_the_stages_and_methods_it_affects_or_named_as_affecting_none():
    """A TrainConfig field missing from every stage's and method's `fields` would let a changed setting
    reuse results it did not make: each field is recorded somewhere or listed in NOT_RECORDED."""
    recorded = [f for stage in train.STAGES.values() for f in stage.fields]
    recorded += [f for method in train.METHODS.values() for f in method.fields]
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert len(recorded) == len(set(recorded)), "a field recorded by two stages"
    assert fields == set(recorded) | set(train.NOT_RECORDED)
    assert not set(recorded) & set(train.NOT_RECORDED)
