"""The IMDb experiment: the KL estimator, the pair builder, the reward model, and the whole
pipeline (smoke preset) including a kill between stages."""
import copy
import functools
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import cli
import evaluate
import train
from checkpoint import read_jsonl
from conftest import sharp_gpt, tiny_gpt
from data import load_imdb
from evaluate import (PairScorer, evaluate_policy, implicit_reward_accuracy, sequence_kl, shown_kl,
                      standard_error)
from pairs import all_pairs

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


class FakeClassifier(torch.nn.Module):
    """P(positive) = the fraction of odd tokens (or of even ones): a score a test can recompute."""

    def __init__(self, odd=1):
        super().__init__()
        self.odd = odd

    def score(self, sequences):
        return np.array([float(np.mean([t % 2 == self.odd for t in s])) for s in sequences])


def test_kl_is_exactly_zero_when_policy_equals_reference():
    policy = tiny_gpt().eval()
    prompts = [[10, 11], [12, 13, 14, 15], [16, 17, 18]]
    metrics, samples = evaluate_policy(policy, copy.deepcopy(policy), FakeClassifier(), FakeClassifier(0), prompts, 6, 2, seed=0)
    completions = [s["completion_ids"] for s in samples]
    assert metrics["kl"] == 0.0 and metrics["kl_se"] == 0.0
    assert all(len(c) == 6 for c in completions)
    assert 0.0 <= metrics["reward"] <= 1.0


def test_point_statistics_equal_direct_computation_from_the_samples():
    """n, the means, the standard errors (sample std / sqrt(n)), the distinct-token ratio and the
    mean per-token reference log-prob, each recomputed from the completions with float64 loops."""
    policy, reference = tiny_gpt(seed=0).eval(), tiny_gpt(seed=1).eval()
    prompts = [[10 + i] * (1 + i % 3) for i in range(9)]
    point, samples = evaluate_policy(policy, reference, FakeClassifier(), FakeClassifier(0), prompts, 5, 4, seed=0)
    completions = [s["completion_ids"] for s in samples]
    assert [s["prompt_ids"] for s in samples] == prompts and [s["reward"] for s in samples] == FakeClassifier().score(
        [p + c for p, c in zip(prompts, completions)]).tolist()
    reference = reference.double()
    texts = [p + c for p, c in zip(prompts, completions)]

    def mean_and_se(values):
        n = len(values)
        mean = sum(values) / n
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    for key, classifier in (("reward", FakeClassifier()), ("judge", FakeClassifier(0))):
        mean, se = mean_and_se([sum(t % 2 == classifier.odd for t in s) / len(s) for s in texts])
        assert point[key] == pytest.approx(mean, abs=1e-12) and point[key + "_se"] == pytest.approx(se, abs=1e-12)
    assert point["n"] == 9 and point["reward_se"] > 0
    assert point["distinct"] == pytest.approx(sum(len(set(c)) / len(c) for c in completions) / 9)
    logps = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):  # log pi_ref(c | p) / len(c), one token at a time
            logits = reference(torch.tensor([p + c]))[0]
            logps.append(sum(logits[len(p) + t - 1].log_softmax(-1)[c[t]].item() for t in range(len(c))) / len(c))
    assert point["reference_logp"] == pytest.approx(sum(logps) / 9, rel=1e-4)
    assert standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)


def test_implicit_reward_accuracy_equals_brute_force_count_on_toy_policy():
    """beta log(pi(y|x) / pi_ref(y|x)) from per-token float64 loops, and the pairs it orders as the
    ground truth did counted one by one (ties one half)."""
    policy, reference = tiny_gpt(seed=0, vocab_size=64).double().eval(), tiny_gpt(seed=1, vocab_size=64).double().eval()
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(6):  # 6 prompts x 4 completions -> 36 pairs sharing completions
        prompt = rng.integers(0, 64, int(rng.integers(2, 5))).tolist()
        completions = [rng.integers(0, 64, 4).tolist() for _ in range(4)]
        rewards = rng.random(4)
        pairs += all_pairs(prompt, completions, rewards)

    def logp(model, prompt, completion):
        logits = model(torch.tensor([prompt + completion]))[0]
        return sum(logits[len(prompt) + t - 1].log_softmax(-1)[completion[t]].item() for t in range(len(completion)))
    beta, right = 0.3, 0.0
    with torch.no_grad():
        for p in pairs:
            r_w = beta * (logp(policy, p["prompt_ids"], p["chosen_ids"]) - logp(reference, p["prompt_ids"], p["chosen_ids"]))
            r_l = beta * (logp(policy, p["prompt_ids"], p["rejected_ids"]) - logp(reference, p["prompt_ids"], p["rejected_ids"]))
            right += 1.0 if r_w > r_l else 0.5 if r_w == r_l else 0.0
    scorer = PairScorer(pairs)
    assert len(scorer.prompts) == 24  # each distinct completion scored once
    accuracy = implicit_reward_accuracy(scorer.logps(policy), scorer.logps(reference), beta)
    assert accuracy == pytest.approx(right / len(pairs), abs=1e-12)
    assert 0.1 < accuracy < 0.9  # a random toy policy: neither all right nor all wrong
    assert implicit_reward_accuracy(scorer.logps(reference), scorer.logps(reference), beta) == 0.5  # pi = pi_ref: all ties


def test_completion_logps_of_left_padded_rows_equal_each_sequence_alone_in_float64(monkeypatch):
    """The evaluator's log pi(y|x) (implicit rewards): prompts of different lengths left-padded into
    passes of KL_ROWS rows, the LM head only where a completion token is predicted, equal a float64
    sum over each prompt + completion run alone, unpadded, through the full head."""
    model = sharp_gpt(vocab_size=101).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 6, 2, 4, 3)]
    completions = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (5, 5, 3, 7, 5)]
    monkeypatch.setattr(evaluate, "KL_ROWS", {"cpu": 2})  # passes of 2, 2 and 1 rows
    got = evaluate.completion_logps(model, prompts, completions)
    assert got.dtype == np.float64 and got.shape == (5,)
    with torch.no_grad():
        for prompt, completion, value in zip(prompts, completions, got):
            logp = model(torch.tensor([prompt + completion]))[0].double().log_softmax(-1)  # row t predicts token t + 1
            expected = sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))
            assert value == pytest.approx(expected, abs=1e-4)


def test_kl_in_chunks_of_rows_equals_kl_in_one_pass(monkeypatch):
    """The KL is computed KL_ROWS sequences at a time, to bound memory (and on a CPU, for speed); the
    chunking changes no number beyond float32 rounding."""
    policy, reference = tiny_gpt(seed=0).eval(), tiny_gpt(seed=1).eval()
    prompts = [[10 + i] * (1 + i % 3) for i in range(7)]
    monkeypatch.setattr(evaluate, "KL_ROWS", {"cpu": 64})
    whole, _ = evaluate_policy(policy, reference, FakeClassifier(), FakeClassifier(0), prompts, 5, 8, seed=0)
    monkeypatch.setattr(evaluate, "KL_ROWS", {"cpu": 2})
    chunked, _ = evaluate_policy(policy, reference, FakeClassifier(), FakeClassifier(0), prompts, 5, 8, seed=0)
    assert whole["kl"] > 0.01
    # the same numbers up to float32 rounding: each chunk left-pads to its own longest prompt
    assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-5) and chunked["reward"] == whole["reward"]


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
    code, log = run_train(args, tmp_path, kill_when=out / "judge_log.jsonl")  # the judge stage, after pairs
    assert code == -signal.SIGKILL, log[-2000:]
    assert not (out / "results.jsonl").exists()
    code, log = run_train(args, tmp_path)
    assert code == 0, log[-3000:]
    for stage in ("sft", "reward", "pairs"):
        assert f"=== {stage}: done already" in log
    assert "=== judge: done already" not in log  # killed while it trained
    rows = read_jsonl(out / "results.jsonl")
    assert {r["method"] for r in rows} == {"SFT", "Preferred-FT", "DPO", "Unlikelihood", "PPO", "PPO-GT", "Best-of-N"}
    assert {r["setting"] for r in rows if r["method"] == "DPO"} == {"beta=0.1", "beta=1"}
    for r in rows:
        assert set(r) >= {"method", "setting", "step", "n", "kl", "kl_se", "reward", "reward_se", "judge", "judge_se",
                          "distinct", "reference_logp", "wall_time"}
        assert 0 <= r["reward"] <= 1 and 0 <= r["judge"] <= 1 and r["kl"] >= -1e-6 and r["n"] == 8
        assert ("implicit_acc_heldout" in r and "implicit_acc_train" in r) == (r["method"] == "DPO")
    dpo_steps = sorted(r["step"] for r in rows if r["method"] == "DPO" and r["setting"] == "beta=0.1")
    assert dpo_steps == [0, 3, 6]  # eval_interval 3 of the smoke preset, 6 steps
    # each evaluation's samples: one row per prefix, whose mean reward is the point's; rescore.py reads them back
    completions = read_jsonl(out / "dpo_beta0.1" / "completions.jsonl")
    for r in rows:
        if r["method"] == "DPO" and r["setting"] == "beta=0.1":
            at_step = [c for c in completions if c["step"] == r["step"]]
            assert sorted(c["index"] for c in at_step) == list(range(8))
            assert sum(c["reward"] for c in at_step) / 8 == pytest.approx(r["reward"], abs=1e-12)
            assert sum(c["kl"] for c in at_step) / 8 == pytest.approx(r["kl"], abs=1e-6)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "rescore.py"), "--run", str(out), "--scorer",
                             str(out / "reward.pt")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for point in read_jsonl(out / "rescored.jsonl"):  # the ground truth itself as the scorer: its own numbers back
        assert point["scorer_reward"] == pytest.approx(point["reward"], abs=1e-9)
    assert sorted(r["step"] for r in rows if r["method"] == "PPO-GT") == [0, 2]  # ppo_eval_interval 2, 2 steps
    assert next(r for r in rows if r["method"] == "SFT")["kl"] == 0.0
    best_of_n = {r["setting"]: r for r in rows if r["method"] == "Best-of-N"}
    assert best_of_n["N=1"]["kl"] == 0.0 and best_of_n["N=2"]["kl"] == pytest.approx(math.log(2) - 1 / 2)
    assert best_of_n["N=2"]["kl_se"] == 0.0  # the bound, the same for every sample
    assert (out / "frontier.png").stat().st_size > 10_000
    pairs = read_jsonl(out / "pairs.jsonl")
    prefixes = {tuple(p["prompt_ids"]) for p in pairs}
    assert len(prefixes) == 16  # no prefix lost
    assert len(pairs) == 6 * 16
    assert all(p["chosen_reward"] >= p["rejected_reward"] for p in pairs)
    times = json.load(open(out / "stage_times.json"))
    assert {"sft", "reward", "rm", "judge", "sft_point", "preferred_ft", "dpo_beta0.1", "dpo_beta1", "unlikelihood_alpha0.5",
            "ppo_kl6", "ppo_gt_kl6", "best_of_n1", "best_of_n2", "report"} <= set(times)  # pairs' time may die with the kill
    assert 0 <= times["rm"]["rm_heldout_acc"] <= 1 and times["ppo_gt_kl6"]["ppo_samples_per_s"] > 0
    assert times["sft"]["sft_tok_per_s"] > 0 and times["dpo_beta0.1"]["dpo_pairs_per_s"] > 0
    assert times["preferred_ft"]["preferred_ft_tok_per_s"] > 0
    for name in ("reward", "judge"):
        assert times[name][f"{name}_reviews_per_s"] > 0
        assert all(0 <= times[name][f"{name}_acc_{n}"] <= 1 for n in ("32", "64", "full"))
    samples = (out / "report.md").read_text().split("```\n")[1]  # the fenced block: the same prefixes before and after DPO
    before, after = samples.split("SFT\n", 1)[1].split("DPO beta=0.1\n")

    def prefixes(block):  # lines "[reward] prefix|completion"
        return [line.split("|")[0][len("[0.00] "):] for line in block.strip().splitlines()]
    assert len(prefixes(before)) == 5 and prefixes(before) == prefixes(after)

    # the held-out pairs: their prompts open test reviews, and none is a training prefix
    test = load_imdb(tiny_imdb, cache_dir=str(tmp_path / "data" / "cache"), verify=False)["test"]
    openings = {tuple(test.review(i)[:n].tolist()) for i in range(len(test)) for n in range(2, 9)}
    heldout = read_jsonl(out / "heldout_pairs.jsonl")
    assert heldout and all(tuple(p["prompt_ids"]) in openings for p in heldout)
    assert not {tuple(p["prompt_ids"]) for p in heldout} & {tuple(p["prompt_ids"]) for p in pairs}

    # a bad --init on a finished run is refused before anything is removed: every file stays as it was
    def tree(folder):
        return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    finished = tree(out)
    (tmp_path / "no_weights").mkdir()
    for init, says in ((tmp_path / "missing", "missing"), (tmp_path / "no_weights", "holds no model.safetensors")):
        code, log = run_train(args + ["--init", str(init)], tmp_path)
        assert code == 2 and "Traceback" not in log and says in log.strip().splitlines()[-1], log[-2000:]
        assert tree(out) == finished

    # the second judge never trains or selects anything: another judge (its logit negated) changes
    # the judge column alone, not one weight of any trained policy, nor any reward or KL
    def trained_weights():
        return {run: torch.load(out / run / f"{name}.pt", weights_only=True)["model"]
                for run, name in (("dpo_beta0.1", "dpo"), ("dpo_beta1", "dpo"), ("preferred_ft", "preferred_ft"),
                                  ("unlikelihood_alpha0.5", "unlikelihood"), ("ppo_kl6", "ppo"), ("ppo_gt_kl6", "ppo"))}
    weights_before, rows_before = trained_weights(), read_jsonl(out / "results.jsonl")
    judge = torch.load(out / "judge.pt", weights_only=True)
    judge["model"] = {k: -v if k.startswith("head.") else v for k, v in judge["model"].items()}
    torch.save(judge, out / "judge.pt")
    code, log = run_train(args + ["--stage", "methods", "--force"], tmp_path)
    assert code == 0, log[-3000:]
    code, log = run_train(args + ["--stage", "report"], tmp_path)
    assert code == 0, log[-3000:]
    rows_after = read_jsonl(out / "results.jsonl")
    assert [(r["method"], r["setting"], r["step"]) for r in rows_after] == [(r["method"], r["setting"], r["step"]) for r in rows_before]
    for before, after in zip(rows_before, rows_after):
        assert after["reward"] == before["reward"] and after["kl"] == before["kl"]
        assert after.get("implicit_acc_heldout") == before.get("implicit_acc_heldout")
        assert after["judge"] == pytest.approx(1 - before["judge"], abs=1e-6)  # sigmoid(-z) = 1 - sigmoid(z)
    for run, state in trained_weights().items():
        assert all(torch.equal(state[k], weights_before[run][k]) for k in state), run

    # --methods picks methods: --force redoes only the chosen one, and the report shows only the chosen ones
    dpo_done = (out / "dpo_beta0.1" / "dpo.pt").stat().st_mtime_ns
    code, log = run_train(args + ["--stage", "methods", "--methods", "sft_point", "--force"], tmp_path)
    assert code == 0, log[-3000:]
    assert "eval SFT  step 0" in log and "eval DPO" not in log
    assert (out / "dpo_beta0.1" / "dpo.pt").stat().st_mtime_ns == dpo_done
    code, log = run_train(args + ["--stage", "report", "--methods", "dpo"], tmp_path)
    assert code == 0, log[-3000:]
    assert {row["method"] for row in read_jsonl(out / "results.jsonl")} == {"DPO"}

    # the DPO family: every loss runs as a method on the same pairs, and the report shows the group
    code, log = run_train(args + ["--methods", "dpo-offline"], tmp_path)
    assert code == 0, log[-3000:]
    rows = read_jsonl(out / "results.jsonl")
    assert {r["method"] for r in rows} == {"SFT", "DPO", "IPO", "KTO", "SimPO", "ORPO"}
    assert {r["method"] for r in rows if "implicit_acc_heldout" in r} == {"DPO", "IPO", "KTO"}  # the losses with a reference
    assert "=== dpo_beta0.1: done already" in log

    # the family's methods that sample: online DPO and RSO at DPO's betas, SPPO; RSO reports its acceptance rate
    code, log = run_train(args + ["--methods", "dpo-online"], tmp_path)
    assert code == 0, log[-3000:]
    rows = read_jsonl(out / "results.jsonl")
    assert {r["method"] for r in rows} == {"SFT", "DPO", "Online DPO", "RSO", "SPPO"}
    assert {r["setting"] for r in rows if r["method"] in ("Online DPO", "RSO")} == {"beta=0.1", "beta=1"}
    assert {r["method"] for r in rows if "implicit_acc_heldout" in r} == {"DPO", "Online DPO", "RSO"}
    assert sorted(r["step"] for r in rows if r["method"] == "SPPO") == [0, 2]  # 2 iterations of 1 step
    times = json.load(open(out / "stage_times.json"))
    assert 0 < times["rso_beta1"]["rso_acceptance_rate"] <= 1 and times["rso_beta1"]["rso_pairs"] > 0
    assert f"RSO (rso_beta1): acceptance rate {times['rso_beta1']['rso_acceptance_rate']:.3f}" in log
    rso = read_jsonl(out / "rso_beta1" / "rso_pairs.jsonl")
    assert {tuple(p["prompt_ids"]) for p in rso} <= {tuple(p["prompt_ids"]) for p in pairs}  # training prefixes; 2 accepted -> 1 pair
    assert len(rso) <= 8 and all(p["chosen_reward"] >= p["rejected_reward"] for p in rso)
    # on request, online DPO and SPPO label their samples with RLHF's learned reward model instead: redone, and named so
    code, log = run_train(args + ["--methods", "online_dpo,sppo", "--online-reward", "learned"], tmp_path)
    assert code == 0, log[-3000:]
    assert "online_dpo_beta0.1 was made with other settings (online_reward ground_truth -> learned)" in log
    assert {r["method"] for r in read_jsonl(out / "results.jsonl")} == {"Online DPO (learned RM)", "SPPO (learned RM)"}


def test_methods_names_groups_expanded_each_method_once():
    def methods(text):
        return train.TrainConfig(methods=text).method_list()
    assert methods("figure2") == ["sft_point", "preferred_ft", "dpo", "unlikelihood", "ppo", "ppo_gt", "best_of_n"]
    assert methods("dpo-offline,dpo,kto") == ["sft_point", "dpo", "ipo", "kto", "simpo", "orpo"]
    assert methods("dpo-online") == ["sft_point", "dpo", "online_dpo", "rso", "sppo"]
    assert methods("dpo-family") == methods("dpo-offline,dpo-online")
    assert methods("all") == list(train.METHODS) and methods(train.TrainConfig().methods) == methods("figure2")
    assert methods("ppo, ppo_gt") == ["ppo", "ppo_gt"]


ADDED_LOSS = """
import os, sys, types
import dpo
dpo.LOSSES["hinge"] = dpo.Loss(dpo.dpo_losses, method="SLiC", settings={"beta": 0.1})  # the README's step 2
import train
from cli import parse_config, run_main
out = sys.argv[1]

def main():
    cfg = parse_config(train.TrainConfig, ["--methods", "hinge", "--out", out] + sys.argv[2:], presets=train.PRESETS)
    print("methods", cfg.method_list(), "runs", train.METHODS["hinge"].runs(cfg))
    print("records", sorted(train.recorded(cfg, train.METHODS["hinge"].settings))[:2])
    train.train_dpo = lambda config, **kw: print("trains", config.loss_type, config.beta, config.lr, config.name) or "x.pt"
    run = types.SimpleNamespace(cfg=cfg, path=lambda name: os.path.join(out, name), evaluator=None)
    for folder, params in train.METHODS["hinge"].runs(cfg).items():
        train.METHODS["hinge"].run(run, run.path(folder), **params)
run_main(main)
"""


def test_a_loss_added_to_the_table_is_a_method_of_train_py_with_its_flags(tmp_path):
    """The README's "adding a method": one line in dpo.LOSSES (SLiC's hinge here, whose function exists)
    gives train.py the method, its flag, its run folder, its recorded settings and its checks."""
    def added(*flags):
        return subprocess.run([sys.executable, "-c", ADDED_LOSS, str(tmp_path)] + list(flags), cwd=ROOT,
                              capture_output=True, text=True)
    result = added("--hinge-beta", "0.3", "--dpo-lr", "0.002")
    assert result.returncode == 0, result.stderr
    assert "methods ['hinge'] runs {'hinge_beta0.3': {'beta': 0.3}}" in result.stdout
    assert "records ['dpo.append_eot', 'dpo.batch_size']" in result.stdout  # DPO's settings, as for every loss
    assert "trains hinge 0.3 0.002 hinge" in result.stdout
    result = added("--hinge-beta", "0")
    assert result.returncode == 2 and result.stderr.strip() == "error: --hinge-beta must be > 0, got 0.0 (see -c --help)"


def own_settings():
    """Every setting train.py records, as recorded: a top-level field by its name, a section's own
    (not fixed) fields as "section.field"; the flat family section by its fields' names."""
    result = set()
    for f in dataclasses.fields(train.TrainConfig):
        section = cli.section_of(f)
        if section is None or f.metadata.get("flat"):
            result.add(f.name)
        else:
            result |= {f"{f.name}.{s.name}" for s in dataclasses.fields(section) if s.name not in f.metadata["fixed"]}
    return result


def test_every_setting_is_recorded_by_the_stages_and_methods_it_affects_or_named_as_affecting_none():
    """A setting no stage or method records would let a changed setting reuse results it did not make:
    each is recorded by the stages or the methods (a section: all of its own settings), or NOT_RECORDED."""
    cfg = train.TrainConfig()
    by_stages = [k for stage in train.STAGES.values() for k in train.recorded(cfg, stage.settings)]
    by_methods = {k for method in train.METHODS.values() for k in train.recorded(cfg, method.settings)}
    assert len(by_stages) == len(set(by_stages)), "a setting recorded by two stages"
    assert not set(by_stages) & by_methods, "a setting recorded by a stage and a method"
    assert own_settings() == set(by_stages) | by_methods | set(train.NOT_RECORDED)
    assert not (set(by_stages) | by_methods) & set(train.NOT_RECORDED)


def trainer_inputs(cfg, name, folder_root, monkeypatch):
    """{run folder: what each run of method `name` hands its trainers and samplers}: the configs (as
    dicts) and the plain numbers and strings of every call, with every trainer replaced by a recorder."""
    from unittest import mock
    calls = []

    def plain(value):
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        if isinstance(value, functools.partial):
            return plain(value.keywords)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if plain(v) is not None}
        return value if isinstance(value, (int, float, str)) else None

    def recorder(returns):
        return lambda *args, **kwargs: (calls.append([plain(a) for a in args] + [plain(kwargs)]), returns)[1]
    for trainer, returns in (("train_dpo", "x.pt"), ("train_lm", "x.pt"), ("train_ppo", "x.pt"), ("train_sppo", "x.pt"),
                             ("rso_pairs", ([], 0.5)), ("generate", [[1]] * 4096), ("reward_function", None),
                             ("load_model", mock.MagicMock()), ("read_jsonl", []), ("score_completions", ({}, []))):
        monkeypatch.setattr(train, trainer, recorder(returns))
    run = types.SimpleNamespace(cfg=cfg, device="cpu", path=lambda n: os.path.join(str(folder_root), n),
                                train_prompts=[[1, 2]] * 4, evaluator=mock.MagicMock(prompts=[[1, 2]] * 4),
                                learned_reward=lambda texts: torch.zeros(len(texts)))
    result = {}
    for folder, params in train.METHODS[name].runs(cfg).items():
        os.makedirs(run.path(folder), exist_ok=True)
        calls.clear()
        train.METHODS[name].run(run, run.path(folder), **params)
        result[folder] = json.dumps(calls, sort_keys=True, default=str)
    return result


WHERE = {"out", "device", "data", "data_verify", "compile", "force", "stage", "methods"}  # where and how, not what


@pytest.mark.parametrize("name", list(train.METHODS))
def test_every_method_run_records_each_setting_its_trainer_reads(name, tmp_path, monkeypatch):
    """Whatever setting changes what a method's run hands its trainer (found by changing each setting of
    train.py in turn and recording the calls) changes what that run records, so the run is redone."""
    cfg = train.TrainConfig()
    before = trainer_inputs(cfg, name, tmp_path / "a", monkeypatch)
    recorded = {folder: train.method_settings(types.SimpleNamespace(cfg=cfg, data_id="d"), name, params)
                for folder, params in train.METHODS[name].runs(cfg).items()}
    checked = 0
    for f in dataclasses.fields(train.TrainConfig):
        section = getattr(cfg, f.name)
        if f.name in WHERE:
            continue
        for field_name in ([s.name for s in dataclasses.fields(section) if s.name not in f.metadata.get("fixed", ())]
                           if dataclasses.is_dataclass(section) else [None]):
            old = getattr(section, field_name) if field_name else section
            new = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 + 1}.get(type(old), lambda v: v)(old)
            if f.name == "online_reward":
                new = "learned"
            elif isinstance(old, str) and field_name is None:
                new = old + "," + str(float(old.split(",")[0]) * 2 + 1) if f.name in ("betas", "ul_alphas", "ppo_target_kls", "bon_ns") else old + "x"
            changed = dataclasses.replace(cfg, **{f.name: dataclasses.replace(section, **{field_name: new}) if field_name else new})
            root = tmp_path / f"{f.name}.{field_name}"  # a new folder: no run finds another's files
            after = trainer_inputs(changed, name, root, monkeypatch)
            for folder, params in train.METHODS[name].runs(changed).items():
                if folder in before and after[folder].replace(str(root), str(tmp_path / "a")) != before[folder]:
                    checked += 1
                    assert train.method_settings(types.SimpleNamespace(cfg=changed, data_id="d"), name, params) != \
                        recorded[folder], f"{name}: --{f.name} {field_name or ''} changes {folder}'s run but not its record"
    assert checked > 0 or name in ("sft_point", "best_of_n"), f"no setting changed what {name} runs: the recorder missed it"


QUICK = ["--preset", "smoke", "--no-data-verify", "--device", "cpu", "--sft-steps", "4", "--reward-steps", "4",
         "--judge-steps", "4", "--methods", "sft_point,dpo", "--betas", "0.1", "--dpo-steps", "4", "--dpo-eval-interval", "2"]


def test_seeds_run_each_method_again_resume_on_their_own_and_report_a_mean_with_its_interval(tmp_path, tiny_imdb):
    """--seeds 2 (--seed-scope methods): seed 1's runs beside seed 0's, which a one-seed run made and which are
    not redone; a kill in seed 1's DPO run resumes it alone; the rows equal an uninterrupted run's."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    args = QUICK + ["--data", tiny_imdb, "--out", str(out)]
    code, log = run_train(args, tmp_path)  # one seed
    assert code == 0, log[-3000:]
    one_seed = read_jsonl(out / "results.jsonl")
    code, log = run_train(args + ["--seeds", "2"], tmp_path, kill_when=out / "dpo_beta0.1_seed1" / "dpo_log.jsonl")
    assert code == -signal.SIGKILL, log[-2000:]
    assert "=== dpo_beta0.1: done already" in log
    code, log = run_train(args + ["--seeds", "2"], tmp_path)
    assert code == 0, log[-3000:]
    assert "=== dpo_beta0.1: done already" in log and "=== sft_point_seed1: done already" in log
    assert "dpo_beta0.1_seed1: done already" not in log  # killed while it trained: continued
    rows = read_jsonl(out / "results.jsonl")
    assert [r for r in rows if r["seed"] == 0] == one_seed  # seed 0 is the one-seed run, untouched
    dpo = {(r["seed"], r["step"]): r for r in rows if r["method"] == "DPO"}
    assert sorted(dpo) == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]
    assert dpo[(1, 0)]["reward"] == dpo[(0, 0)]["reward"]  # step 0 is the SFT model: the same fixed evaluation
    assert dpo[(1, 4)]["reward"] != dpo[(0, 4)]["reward"]  # another seed, another training run
    code, log = run_train(QUICK + ["--data", tiny_imdb, "--out", str(straight), "--seeds", "2"], tmp_path)
    assert code == 0, log[-3000:]

    def numbers(rows):
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert numbers(read_jsonl(straight / "results.jsonl")) == numbers(rows)
    report = (out / "report.md").read_text()
    assert "95% interval over 2 seeds" in report and "gain in reward over SFT at KL <= 10" in report


def test_seed_scope_all_reruns_every_stage_in_its_own_folder(tmp_path, tiny_imdb):
    out = tmp_path / "run"
    code, log = run_train(QUICK + ["--data", tiny_imdb, "--out", str(out), "--seeds", "2", "--seed-scope", "all"], tmp_path)
    assert code == 0, log[-3000:]
    assert (out / "sft.pt").exists() and (out / "seed1" / "sft.pt").exists() and (out / "seed1" / "dpo_beta0.1").is_dir()
    assert (out / "pairs.jsonl").read_bytes() != (out / "seed1" / "pairs.jsonl").read_bytes()  # another SFT model's samples
    rows = read_jsonl(out / "results.jsonl")
    sft = {r["seed"]: r for r in rows if r["method"] == "SFT"}
    assert sorted(sft) == [0, 1] and sft[0]["reward"] != sft[1]["reward"]
    assert not (out / "seed1" / "results.jsonl").exists()  # one report, of both seeds
