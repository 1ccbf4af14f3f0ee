"""
The paper's evaluation of the IMDb experiment: sample completions of held-out prompts from the
policy, score them with the ground-truth reward, and measure how far the policy moved from the
reference with the sequence-level KL(pi || pi_ref). Each evaluation is one point of the
reward-vs-KL frontier (Figure 2, left), with n and standard errors, the second judge's score of the
same samples, and two degeneration signals. For DPO, the implicit reward beta log(pi / pi_ref)
(Eq. 5) is also checked against the ground truth's preferences on held-out and training pairs.
"""
import os
import time

import numpy as np
import torch

from checkpoint import append_jsonl
from data import get_encoding
from device import autocast, gather, local_slice, print0, rank
from logprobs import prompt_completion_rows, response_token_logps, sequence_logps, token_logps
from sample import generate

# Sequences per forward pass when the KL and log-probs of completions are computed, by device. On a
# GPU their (rows, T, V) logits and float32 temporaries bound the memory. On a CPU, temporaries larger
# than its caches make every row slower: on 2 cores, 96 sequences of 32 tokens took 2.6 s in passes
# of 4 rows and 9.6 s in passes of 64.
KL_ROWS = {"cuda": 64, "cpu": 4}


def sequence_kl(policy_logits, reference_logits, response_mask):
    """KL(pi(y|x) || pi_ref(y|x)) of the sampled sequences, estimated as the paper does: the sum over
    generated positions t of the exact per-step KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), whose
    expectation under y ~ pi is the sequence-level KL. Logits (B, T, V) with logits[:, t] predicting
    token t + 1; response_mask (B, T) marks generated tokens. Returns (B,) float32."""
    policy_logp = policy_logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V): predicts tokens 1..T-1
    reference_logp = reference_logits[:, :-1].float().log_softmax(-1)
    step_kl = (policy_logp.exp() * (policy_logp - reference_logp)).sum(-1)  # (B, T-1)
    return torch.where(response_mask[:, 1:].bool(), step_kl, 0.0).sum(-1)


def standard_error(values):
    """The standard error of a mean over n independent samples: sample std (n - 1) / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def distinct_ratio(completion):
    """Distinct tokens / tokens of one completion: near 1 for varied text, low for "great great great"."""
    return len(set(completion)) / max(1, len(completion))


def row_passes(prompts, completions, device):
    """prompt_completion_rows of KL_ROWS[device type] sequences at a time, in order."""
    rows = KL_ROWS[device.type]
    for i in range(0, len(prompts), rows):
        yield prompt_completion_rows(prompts[i:i + rows], completions[i:i + rows], device)


@torch.no_grad()
def completion_logps(model, prompts, completions):
    """log pi(y | x) of each completion after its prompt, summed over the completion's tokens: (N,) float64 numpy."""
    device = next(model.parameters()).device
    out = [torch.zeros(0, dtype=torch.float64)]
    for ids, mask, response_mask in row_passes(prompts, completions, device):
        with autocast(device.type):  # the LM head only where a completion token is predicted
            out.append(response_token_logps(model, ids, response_mask, attention_mask=mask).sum(-1).double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, judge, prompts, max_new_tokens, batch_size, seed):
    """One frontier point: one completion per prompt (temperature 1, full vocabulary, fixed length),
    scored by score_completions with the sequence KL of the policy to the reference. Returns the
    point and its samples, as score_completions does (under torchrun each rank samples a share)."""
    policy_was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed + rank())
    prompts = local_slice(prompts)
    completions = generate(policy, prompts, max_new_tokens, stop_at_eot=False, generator=generator, batch_size=batch_size)
    point, samples = score_completions(prompts, completions, reference, reward_model, judge, policy=policy)
    policy.train(policy_was_training)
    return point, samples


@torch.no_grad()
def score_completions(prompts, completions, reference, reward_model, judge, policy=None, kl=None):
    """The point of completions of equal length (this rank's share; the point is over all ranks'):
    n, the mean and standard error of the reward, of the second judge and of the KL, and the
    degeneration signals: the distinct-token ratio and the mean per-token log-prob under the
    reference. The KL is the sequence KL of `policy` to the reference, or, without a policy
    (Best-of-N), the given value for every sample. Returns the point and its samples, every rank's:
    [{"prompt_ids", "completion_ids", "reward", "judge", "kl"}], one per prompt, in order."""
    device = next(reference.parameters()).device
    length = len(completions[0]) if completions else 1
    kls, reference_logps = [], []
    for ids, mask, response_mask in row_passes(prompts, completions, device):
        with autocast(device.type):
            reference_logits = reference(ids, mask)
            if policy is not None:
                kls.append(sequence_kl(policy(ids, mask), reference_logits, response_mask).cpu())
            logps = token_logps(reference_logits, reference.output_rows(ids))
            reference_logps.append(sequence_logps(logps, response_mask[:, 1:].bool()).cpu() / length)
    texts = [p + c for p, c in zip(prompts, completions)]
    samples = {"reward": reward_model.score(texts).tolist(), "judge": judge.score(texts).tolist(),
               "kl": torch.cat(kls + [torch.zeros(0)]).tolist() if policy is not None else [float(kl)] * len(texts),
               "distinct": [distinct_ratio(c) for c in completions],
               "reference_logp": torch.cat(reference_logps + [torch.zeros(0)]).tolist()}
    samples["prompt_ids"], samples["completion_ids"] = [[int(t) for t in p] for p in prompts], [[int(t) for t in c] for c in completions]
    samples = {k: gather(v) for k, v in samples.items()}  # every rank's share
    point = {"n": len(samples["reward"])}
    for k in ("reward", "judge", "kl", "distinct", "reference_logp"):
        point[k] = float(np.mean(samples[k]))
        if k in ("reward", "judge", "kl"):
            point[k + "_se"] = standard_error(samples[k])
    kept = ("prompt_ids", "completion_ids", "reward", "judge", "kl")
    return point, [{k: samples[k][i] for k in kept} for i in range(point["n"])]


def implicit_reward_accuracy(policy_logps, reference_logps, beta):
    """How often DPO's implicit reward r = beta log(pi(y|x) / pi_ref(y|x)) (Eq. 5) ranks a pair as the
    ground truth did. Arrays (N, 2) of [chosen, rejected] log-probs; a tie counts one half (at step 0
    pi = pi_ref, every implicit reward is 0, and the accuracy is exactly 0.5)."""
    chosen = beta * (policy_logps[:, 0] - reference_logps[:, 0])
    rejected = beta * (policy_logps[:, 1] - reference_logps[:, 1])
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


class PairScorer:
    """The log-probs of preference pairs under a model, each distinct (prompt, completion) computed
    once (a prefix's 4 completions make its 6 pairs): logps(model) -> (N, 2) [chosen, rejected]."""

    def __init__(self, pairs):
        keys = {}
        self.index = np.array([[keys.setdefault((tuple(p["prompt_ids"]), tuple(p[side])), len(keys))
                                for side in ("chosen_ids", "rejected_ids")] for p in pairs]).reshape(-1, 2)
        self.prompts = [list(prompt) for prompt, _ in keys]
        self.completions = [list(completion) for _, completion in keys]

    def logps(self, model):
        return completion_logps(model, self.prompts, self.completions)[self.index]


class Evaluator:
    """Every method's evaluation on the same held-out prefixes, with the same reference, reward model
    and judge: evaluator(policy, method, setting, step, log_path) appends one frontier point to
    log_path; evaluator.record(...) does so for completions made another way (Best-of-N).
    evaluator.implicit(policy, beta) measures DPO's implicit reward on held-out and training pairs."""

    def __init__(self, reference, reward_model, judge, prompts, max_new_tokens, batch_size, seed, preference_sets):
        self.reference, self.reward_model, self.judge, self.prompts = reference, reward_model, judge, prompts
        self.max_new_tokens, self.batch_size, self.seed = max_new_tokens, batch_size, seed
        self.scorers = {name: PairScorer(pairs) for name, pairs in preference_sets.items()}
        self.reference_logps = {}  # computed on first use: the reference is fixed
        self.sft_point = None
        self.t0 = time.time()

    def implicit(self, policy, beta):
        """{"implicit_acc_<set>": accuracy} for each preference set (held-out, training sample)."""
        result = {}
        for name, scorer in self.scorers.items():
            if name not in self.reference_logps:
                self.reference_logps[name] = scorer.logps(self.reference)
            result[f"implicit_acc_{name}"] = implicit_reward_accuracy(scorer.logps(policy), self.reference_logps[name], beta)
        return result

    def __call__(self, policy, method, setting, step, log_path, implicit_beta=None):
        """Sample the policy's point; with implicit_beta, also its implicit-reward accuracies (DPO).
        Every method starts from the SFT model, so every step-0 point is the SFT point: sampled once."""
        t0 = time.time()
        if step == 0 and self.sft_point is not None:
            point, samples = dict(self.sft_point[0]), self.sft_point[1]
        else:
            point, samples = evaluate_policy(policy, self.reference, self.reward_model, self.judge, self.prompts,
                                             self.max_new_tokens, self.batch_size, seed=self.seed)
            self.sft_point = (dict(point), samples) if step == 0 else self.sft_point
        t1 = time.time()
        if implicit_beta is not None:
            point.update(self.implicit(policy, implicit_beta))
        took = f"{t1 - t0:.1f}s point" + (f" + {time.time() - t1:.1f}s implicit reward" if implicit_beta is not None else "")
        return self.record(point, samples, method, setting, step, log_path, took)

    def record(self, point, samples, method, setting, step, log_path, took=""):
        """Append a point as a row {method, setting, step, ...} to log_path and its samples, one row per
        prompt {method, setting, step, index, prompt_ids, completion_ids, prompt, completion, reward, judge,
        kl}, to completions.jsonl beside it; print the point (with `took`, how long it took); return it."""
        enc = get_encoding()
        append_jsonl(os.path.join(os.path.dirname(log_path), "completions.jsonl"), *(
            {"method": method, "setting": setting, "step": step, "index": i, **sample, "prompt": enc.decode(sample["prompt_ids"]),
             "completion": enc.decode(sample["completion_ids"])} for i, sample in enumerate(samples)))
        append_jsonl(log_path, {"method": method, "setting": setting, "step": step, **point, "wall_time": time.time() - self.t0})
        shown = "".join(f" | {k} {v:.3f}" for k, v in point.items() if k.startswith("implicit"))
        print0(f"eval {method} {setting} step {step}: reward {point['reward']:.3f} ± {point['reward_se']:.3f} | "
               f"judge {point['judge']:.3f} ± {point['judge_se']:.3f} | kl {shown_kl(point['kl'], 3)} | "
               f"distinct {point['distinct']:.2f} | ref logp {point['reference_logp']:.2f}{shown}" + (f" | {took}" if took else ""))
        return point


def shown_kl(kl, digits):
    """A KL for people: never negative (a true KL is >= 0; a tiny negative is float32 rounding), so
    a KL that rounds to zero reads 0.00, not -0.00."""
    return f"{max(kl, 0.0):.{digits}f}"
