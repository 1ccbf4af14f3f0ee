"""
The paper's controlled-sentiment experiment (IMDb, Figure 2 left), end to end. The stages, in order:

  sft       next-token training on IMDb reviews                         -> OUT/sft.pt
  reward    the reward r(x, y) = P(positive | x + y), an n-gram classifier -> OUT/reward.pt
  pairs     4 SFT samples per train prefix, all 6 pairs, labelled by r   -> OUT/pairs.jsonl
            the same from held-out test prefixes                         -> OUT/heldout_pairs.jsonl
  rm        RLHF's reward model, Bradley-Terry on the pairs (PPO, Best-of-N) -> OUT/rm.pt
  judge     the second judge, a GPT-trunk classifier; it only evaluates   -> OUT/judge.pt
  methods   every method of METHODS, evaluated on held-out test prefixes -> OUT/<run>/eval.jsonl
  report    results.jsonl, frontier.png, summary tables, samples before/after DPO

The methods (each one entry of METHODS in train.py). --methods picks some, or a group: figure2 (the
default: the paper's Figure 2), dpo-family (DPO beside IPO, KTO, SimPO, ORPO, online DPO, RSO and SPPO; its
halves are dpo-offline and dpo-online), or all:

  sft_point     the SFT model itself, the KL = 0 point                  -> OUT/sft_point/
  preferred_ft  SFT continued on the best completion of each prefix      -> OUT/preferred_ft/
  dpo           DPO for each beta, evaluated every eval_interval steps   -> OUT/dpo_beta<beta>/
  unlikelihood  the Unlikelihood baseline for each alpha                 -> OUT/unlikelihood_alpha<alpha>/
  ppo           PPO on the learned reward (rm.pt), for each target KL    -> OUT/ppo_kl<target>/
  ppo_gt        PPO on the ground-truth reward, for each target KL       -> OUT/ppo_gt_kl<target>/
  best_of_n     the best of N SFT samples under rm.pt, for each N         -> OUT/best_of_n<N>/
  ipo, kto, simpo, orpo   the DPO family's losses, with DPO's settings    -> OUT/<method>_<setting>/
  online_dpo    DPO on pairs sampled from the policy as it trains        -> OUT/online_dpo_beta<beta>/
  rso           DPO on pairs of samples of pi* (rejection sampling)      -> OUT/rso_beta<beta>/
  sppo          self-play preference optimization                        -> OUT/sppo_eta<eta>/

OUT/settings.json records, for each stage and each method run, the settings its artifacts were
made with. A stage or run already done with the current settings is skipped (a killed run continues
where it stopped); one made with other settings is redone, and so is everything after it. --force
redoes the ones that run, and --stage NAME runs one stage.

    python train.py                   # preset gpu when CUDA is present, else cpu
    python train.py --preset smoke    # seconds; numbers meaningless
    python train.py --stage methods --methods dpo --betas 0.1
    python train.py --methods dpo-family
"""
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch

from bradley_terry import BradleyTerryConfig, train_bradley_terry
from checkpoint import atomic_write, load_model, read_json, read_jsonl, save_json, write_jsonl
from cli import UserError, check, is_plain_name, parse_config, run_main
from data import EOT, get_encoding, load_imdb, make_prefixes
from device import barrier, check_divisible, hardware_name, is_main, local_slice, print0, rank, setup_device
from dpo import REFERENCE_FREE, DPOConfig, train_dpo
from evaluate import Evaluator, plot_frontier, score_completions, shown_kl
from online import SPPOConfig, online_pairs, train_sppo
from pairs import best_completions, rso_pairs, sample_and_label
from ppo import PPOConfig, train_ppo
from reward import RewardConfig, load_classifier, reward_function, train_reward
from sample import generate
from sft import SFTConfig, build_model, train_lm


class Run:
    """What every stage and method is handed: the config, the tokenized data, the device, and the
    evaluator, built on first use (it needs the models of the sft and reward stages)."""

    def __init__(self, cfg, imdb, device):
        self.cfg, self.imdb, self.device = cfg, imdb, device
        # the prompts, made here so that a data set too small for the settings is refused before any work
        self.train_prompts = self.prefixes("train", cfg.n_prefixes, cfg.seed, "--n-prefixes")
        self.eval_prompts = self.prefixes("test", cfg.eval_prefixes, cfg.seed + 1, "--eval-prefixes")
        # the held-out preference set: test prefixes only, none equal to a training prefix
        train = {tuple(p) for p in self.train_prompts}
        self.heldout_prompts = [p for p in self.prefixes("test", cfg.heldout_prefixes, cfg.seed + 2, "--heldout-prefixes")
                                if tuple(p) not in train]
        if not self.heldout_prompts:
            raise UserError(f"all {cfg.heldout_prefixes} held-out test prefixes equal training prefixes; raise --heldout-prefixes")
        for flag, n in (("--reward-test-reviews", cfg.reward_test_reviews), ("--judge-test-reviews", cfg.judge_test_reviews)):
            if n > len(imdb["test"]):
                raise UserError(f"{flag} {n} exceeds the {len(imdb['test'])} test reviews")
        self.records = read_records(self.path("settings.json"))

    def prefixes(self, split, n, seed, flag):
        try:
            return make_prefixes(self.imdb[split], n, seed=seed)
        except ValueError as e:
            raise UserError(f"{flag} {n} is too many for the data: {e} in the {split} split") from None

    def path(self, name):
        return os.path.join(self.cfg.out, name)

    @functools.cached_property
    def evaluator(self):
        cfg = self.cfg
        train_pairs = read_jsonl(self.path("pairs.jsonl"))
        sampled = {tuple(p) for p in self.train_prompts[:cfg.heldout_prefixes]}  # as many training prefixes as held out
        preference_sets = {"heldout": read_jsonl(self.path("heldout_pairs.jsonl")),
                           "train": [p for p in train_pairs if tuple(p["prompt_ids"]) in sampled]}
        return Evaluator(load_model(self.path("sft.pt")).to(self.device).eval(),
                         load_classifier(self.path("reward.pt")).to(self.device),
                         load_classifier(self.path("judge.pt")).to(self.device),
                         self.eval_prompts, cfg.max_new_tokens, cfg.sample_batch_size, cfg.seed, preference_sets)

    @functools.cached_property
    def learned_reward(self):
        """RLHF's Bradley-Terry reward r(x, y) from rm.pt, loaded once for every Best-of-N run."""
        return reward_function(self.path("rm.pt"), self.device)

    @functools.cached_property
    def data_id(self):
        """The tokenized IMDb's contents, for the records: the same data under any path is the same run."""
        h = hashlib.sha256()
        for split in sorted(self.imdb):
            for array in (self.imdb[split].tokens, self.imdb[split].offsets, self.imdb[split].labels):
                h.update(np.ascontiguousarray(array).data)
        return "sha256:" + h.hexdigest()[:16]


# ---------------------------------------------------------------------------- stages
def sft_config(cfg):
    return SFTConfig(out=cfg.out, name="sft", data=cfg.data, init=cfg.init, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, block_size=cfg.block_size, batch_size=cfg.sft_batch_size,
                     grad_accum=cfg.sft_grad_accum, max_steps=cfg.sft_steps, lr=cfg.sft_lr, min_lr=cfg.sft_min_lr,
                     warmup_steps=max(1, cfg.sft_steps // 20), log_interval=max(1, cfg.sft_steps // 20),
                     eval_interval=max(1, cfg.sft_steps // 4), save_interval=max(1, cfg.sft_steps // 4),
                     seed=cfg.seed, device=cfg.device, compile=cfg.compile)


def run_sft(run):
    train_tokens = np.concatenate([run.imdb["train"].tokens, run.imdb["unsup"].tokens])  # test is held out
    train_lm(sft_config(run.cfg), train_tokens, run.imdb["test"].tokens)
    return throughput([run.path("sft_log.jsonl")], "tok_per_s", "sft_")


def reward_config(cfg):
    return RewardConfig(kind="ngram", name="reward", out=cfg.out, data=cfg.data, max_steps=cfg.reward_steps,
                        lr=cfg.reward_lr, order=cfg.reward_order, bits=cfg.reward_bits, test_reviews=cfg.reward_test_reviews,
                        log_interval=max(1, cfg.reward_steps // 10), seed=cfg.seed, device=cfg.device)


def judge_config(cfg):
    return RewardConfig(kind="gpt", name="judge", sft=os.path.join(cfg.out, "sft.pt"), out=cfg.out, data=cfg.data,
                        max_len=cfg.judge_max_len, batch_size=cfg.judge_batch_size, max_steps=cfg.judge_steps,
                        lr=cfg.judge_lr, warmup_steps=max(1, cfg.judge_steps // 10), test_reviews=cfg.judge_test_reviews,
                        log_interval=max(1, cfg.judge_steps // 10), save_interval=max(1, cfg.judge_steps // 4),
                        seed=cfg.seed, device=cfg.device)


def run_classifier(run, name, config):
    """The reward model or the second judge: two classifiers of different kinds on the same labels."""
    _, accuracy = train_reward(config, run.imdb)
    return {**{f"{name}_{k}": v for k, v in accuracy.items()},
            **throughput([run.path(f"{name}_log.jsonl")], "reviews_per_s", f"{name}_")}


def run_pairs(run):
    cfg = run.cfg
    policy = load_model(run.path("sft.pt")).to(run.device).eval()
    reward_model = load_classifier(run.path("reward.pt")).to(run.device)
    result = {}
    # the training pairs, and the held-out ones made the same way from test prefixes (for the implicit reward)
    for name, prompts, seed in (("pairs", run.train_prompts, cfg.seed), ("heldout_pairs", run.heldout_prompts, cfg.seed + 2)):
        pairs, mean_reward, tokens_per_s = sample_and_label(policy, reward_model, prompts, cfg.completions_per_prefix,
                                                            cfg.max_new_tokens, cfg.sample_batch_size, seed)
        write_jsonl(run.path(f"{name}.jsonl"), pairs)
        gap = float(np.mean([p["chosen_reward"] - p["rejected_reward"] for p in pairs]))
        print0(f"{name}: {len(pairs)} pairs from {len(prompts)} prefixes, mean reward {mean_reward:.3f}, "
               f"mean chosen-rejected reward gap {gap:.3f}")
        result[name] = {"pairs": len(pairs), "prefixes": len(prompts), "mean_reward_gap": gap,
                        "sft_sample_reward": mean_reward, "sampling_tokens_per_s": tokens_per_s}
    return result


def rm_config(cfg):
    return BradleyTerryConfig(sft=os.path.join(cfg.out, "sft.pt"), pairs=os.path.join(cfg.out, "pairs.jsonl"),
                              heldout=os.path.join(cfg.out, "heldout_pairs.jsonl"), out=cfg.out, name="rm",
                              epochs=cfg.rm_epochs, batch_size=cfg.rm_batch_size, lr=cfg.rm_lr, seed=cfg.seed, device=cfg.device)


def run_rm(run):
    """RLHF's reward model, Bradley-Terry on the training pairs; its held-out pair accuracy is the
    number to set beside DPO's implicit-reward accuracy."""
    _, accuracy = train_bradley_terry(rm_config(run.cfg))
    return {"rm_heldout_acc": accuracy["heldout_acc"], "rm_train_acc": accuracy["train_acc"], "rm_step": accuracy["step"],
            **throughput([run.path("rm_log.jsonl")], "pairs_per_s", "rm_")}


def run_methods(run):
    """Every run of every chosen method not done yet with these settings, each timed into stage_times.json."""
    for name in run.cfg.method_list():
        method = METHODS[name]
        for folder, params in method.runs(run.cfg).items():
            t0 = time.time()
            result = bring_up_to_date(run, folder, "methods", method_settings(run, name, params), [folder],
                                      lambda: method.run(run, run.path(folder), **params))
            if result is not None:
                record_time(run, folder, time.time() - t0, result)
    return None  # each run recorded its own time


# ---------------------------------------------------------------------------- methods
# Each method trains (or not) from the SFT model and appends its evaluations to FOLDER/eval.jsonl.
def run_sft_point(run, folder):
    """The SFT model itself: the reference, at KL = 0."""
    run.evaluator(load_model(run.path("sft.pt")).to(run.device), "SFT", "", 0, os.path.join(folder, "eval.jsonl"))
    return {}


def run_preferred_ft(run, folder):
    """Preferred-FT: SFT continued on the best-rewarded completion of each training prefix."""
    cfg = run.cfg
    sequences = best_completions(read_jsonl(run.path("pairs.jsonl")))
    stream = np.array([t for sequence in sequences for t in sequence + [EOT]], dtype=np.uint16)
    pft_path = train_lm(pft_config(cfg, folder), stream, stream)
    run.evaluator(load_model(pft_path).to(run.device), "Preferred-FT", "", cfg.pft_steps, os.path.join(folder, "eval.jsonl"))
    return throughput([os.path.join(folder, "preferred_ft_log.jsonl")], "tok_per_s", "preferred_ft_")


def pft_config(cfg, folder):
    return SFTConfig(out=folder, name="preferred_ft", init=os.path.join(cfg.out, "sft.pt"), block_size=cfg.block_size,
                     batch_size=cfg.sft_batch_size, max_steps=cfg.pft_steps, lr=cfg.pft_lr, min_lr=cfg.pft_lr,
                     warmup_steps=1, log_interval=max(1, cfg.pft_steps // 5), eval_interval=cfg.pft_steps,
                     eval_batches=2, save_interval=cfg.pft_steps, seed=cfg.seed, device=cfg.device, compile=False)


def run_preference_loss(run, folder, method, loss_type, name, pairs=None, sample_pairs=None, **loss_settings):
    """A loss of dpo.py on the offline pairs: DPO itself, its family (IPO, KTO, SimPO, ORPO) or the
    Unlikelihood baseline, each trained exactly as DPO is (dpo.py's trainer, DPO's steps, batch,
    optimizer and lr) and evaluated every eval_interval steps. The losses with a reference also
    report the implicit reward's accuracy, beta log(pi / pi_ref) (Eq. 5). pairs: another pair file
    (RSO's); sample_pairs: pairs sampled as it trains instead (online DPO)."""
    log = os.path.join(folder, "eval.jsonl")
    config = replace(dpo_config(run.cfg, folder, loss_settings.get("beta", 1.0), pairs), name=name, loss_type=loss_type,
                     precompute_ref=run.cfg.precompute_ref and loss_type != "kto" and sample_pairs is None,  # live pi_ref:
                     **loss_settings)  # KTO's mismatched rows, online DPO's new samples
    setting = ", ".join(f"{k}={v:g}" for k, v in loss_settings.items())
    implicit_beta = None if loss_type in REFERENCE_FREE else config.beta
    train_dpo(config, sample_pairs=sample_pairs,
              evaluate=lambda step, policy: run.evaluator(policy, method, setting, step, log, implicit_beta=implicit_beta))
    return throughput([os.path.join(folder, f"{name}_log.jsonl")], "pairs_per_s", f"{name}_")


ONLINE_REWARDS = {"ground_truth": "reward.pt", "learned": "rm.pt"}  # --online-reward: the labeller of new samples


def online_method(cfg, name):
    """Online DPO's and SPPO's label on the frontier: the labeller is named when it is the learned reward model."""
    return name if cfg.online_reward == "ground_truth" else f"{name} (learned RM)"


def run_online_dpo(run, folder, beta):
    """Online DPO (online.py): DPO's trainer and settings, each step's pairs sampled from the policy
    itself and labelled by --online-reward (the ground truth by default)."""
    cfg = run.cfg
    reward_fn = reward_function(run.path(ONLINE_REWARDS[cfg.online_reward]), run.device)
    sampler = functools.partial(online_pairs, prompts=run.train_prompts, reward_fn=reward_fn, batch_size=cfg.dpo_batch_size,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return run_preference_loss(run, folder, online_method(cfg, "Online DPO"), "sigmoid", "online_dpo",
                               sample_pairs=sampler, beta=beta)


def run_rso(run, folder, beta):
    """RSO: DPO at beta on pairs of samples of pi* = pi_ref exp(r / beta) / Z (Eq. 4) instead of the
    SFT model's: rso_candidates SFT samples of each of rso_prefixes training prefixes, rso_accept of
    them accepted by rejection sampling under the learned reward (rm.pt), and every pair of those,
    labelled by the ground truth (pairs.rso_pairs)."""
    cfg = run.cfg
    sampling, rso_pairs_path = os.path.join(folder, "rso_sampling.json"), os.path.join(folder, "rso_pairs.jsonl")
    # the sampling record is written after the pairs: a run killed while sampling, or one whose pairs were deleted, samples again
    if not (os.path.exists(sampling) and os.path.exists(rso_pairs_path)):
        policy = load_model(run.path("sft.pt")).to(run.device).eval()
        pairs, rate = rso_pairs(policy, run.learned_reward, run.evaluator.reward_model, run.train_prompts[:cfg.rso_prefixes],
                                cfg.rso_candidates, cfg.rso_accept, beta, cfg.max_new_tokens, cfg.sample_batch_size, cfg.seed)
        write_jsonl(rso_pairs_path, pairs)
        save_json(sampling, {"acceptance_rate": rate, "pairs": len(pairs)})
    accepted = read_json(sampling)
    print0(f"RSO beta={beta:g}: acceptance rate {accepted['acceptance_rate']:.3f} (one in {1 / accepted['acceptance_rate']:.1f} "
           f"SFT samples is a sample of pi*), {accepted['pairs']} pairs")
    result = run_preference_loss(run, folder, "RSO", "sigmoid", "rso", pairs=rso_pairs_path, beta=beta)
    return {**result, "rso_acceptance_rate": accepted["acceptance_rate"], "rso_pairs": accepted["pairs"]}


def run_sppo(run, folder, eta):
    """SPPO (online.py): sppo_iterations of self-play from the SFT model, each on sppo_prompts training
    prefixes with sppo_samples completions each, win rates from --online-reward's logit; DPO's
    optimizer, lr and rows per step (2 x dpo_batch_size), evaluated every eval_interval steps."""
    cfg = run.cfg
    log = os.path.join(folder, "eval.jsonl")
    train_sppo(sppo_config(cfg, folder, eta), run.train_prompts,
               evaluate=lambda step, policy: run.evaluator(policy, online_method(cfg, "SPPO"), f"eta={eta:g}", step, log))
    return throughput([os.path.join(folder, "sppo_log.jsonl")], "samples_per_s", "sppo_")


def sppo_config(cfg, folder, eta):
    batch_size = 2 * cfg.dpo_batch_size  # the rows of one DPO step
    steps_per_iteration = max(1, cfg.sppo_prompts * cfg.sppo_samples // batch_size)
    return SPPOConfig(sft=os.path.join(cfg.out, "sft.pt"), reward=os.path.join(cfg.out, ONLINE_REWARDS[cfg.online_reward]),
                      out=folder, iterations=cfg.sppo_iterations, prompts_per_iteration=cfg.sppo_prompts,
                      samples_per_prompt=cfg.sppo_samples, eta=eta, batch_size=batch_size, optimizer=cfg.dpo_optimizer,
                      lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup_steps, max_new_tokens=cfg.max_new_tokens,
                      log_interval=max(1, cfg.eval_interval // 5),
                      eval_interval=max(1, cfg.eval_interval // steps_per_iteration), seed=cfg.seed, device=cfg.device)


def dpo_config(cfg, folder, beta, pairs=None):
    return DPOConfig(sft=os.path.join(cfg.out, "sft.pt"), pairs=pairs or os.path.join(cfg.out, "pairs.jsonl"), out=folder, beta=beta,
                     batch_size=cfg.dpo_batch_size, micro_batch_size=cfg.dpo_micro_batch_size,
                     optimizer=cfg.dpo_optimizer, lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup_steps,
                     max_steps=cfg.dpo_steps, append_eot=cfg.dpo_append_eot, precompute_ref=cfg.precompute_ref,
                     log_interval=max(1, cfg.eval_interval // 5), eval_interval=cfg.eval_interval,
                     save_interval=cfg.eval_interval, seed=cfg.seed, device=cfg.device)


def run_ppo(run, folder, target_kl, reward):
    """PPO (ppo.py) on the training prefixes toward one target KL: on the learned Bradley-Terry reward
    (rm.pt: the paper's PPO) or on the ground truth itself (reward.pt: PPO-GT)."""
    method = "PPO" if reward == "rm.pt" else "PPO-GT"
    log = os.path.join(folder, "eval.jsonl")
    train_ppo(ppo_config(run.cfg, folder, target_kl, reward), run.train_prompts,
              evaluate=lambda step, policy: run.evaluator(policy, method, f"target KL={target_kl:g}", step, log))
    return throughput([os.path.join(folder, "ppo_log.jsonl")], "samples_per_s", "ppo_")


def ppo_config(cfg, folder, target_kl, reward):
    return PPOConfig(sft=os.path.join(cfg.out, "sft.pt"), reward=os.path.join(cfg.out, reward), out=folder,
                     max_new_tokens=cfg.max_new_tokens, steps=cfg.ppo_steps, batch_size=cfg.ppo_batch_size,
                     minibatch_size=cfg.ppo_minibatch_size, epochs=cfg.ppo_epochs, lr=cfg.ppo_lr, critic_lr=cfg.ppo_critic_lr,
                     init_kl_coef=cfg.ppo_init_kl_coef, target_kl=target_kl, norm_samples=cfg.ppo_batch_size,
                     eval_interval=cfg.ppo_eval_interval, save_interval=cfg.ppo_eval_interval, seed=cfg.seed, device=cfg.device)


def run_best_of_n(run, folder, n):
    """Best-of-N: N samples of the SFT model for each evaluation prompt, the best under the learned
    reward model (rm.pt) kept and scored like every other method. Its KL to the SFT model is at most
    log N - (N - 1) / N (Stiennon et al. 2020; a bound, Beirami et al. 2024), the value shown."""
    cfg, evaluator = run.cfg, run.evaluator
    prompts = local_slice(evaluator.prompts)  # under torchrun each rank takes a share
    repeated = [p for p in prompts for _ in range(n)]
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed + 1000 * n + rank())
    candidates = generate(evaluator.reference, repeated, cfg.max_new_tokens, stop_at_eot=False, generator=generator,
                          batch_size=cfg.sample_batch_size)
    best = run.learned_reward([p + c for p, c in zip(repeated, candidates)]).reshape(len(prompts), n).argmax(1)
    point = score_completions(prompts, [candidates[i * n + j] for i, j in enumerate(best)], evaluator.reference,
                              evaluator.reward_model, evaluator.judge, kl=math.log(n) - (n - 1) / n)
    evaluator.record(point, "Best-of-N", f"N={n}", 0, os.path.join(folder, "eval.jsonl"))
    return {}


# ---------------------------------------------------------------------------- report
def read_rows(jsonl):
    """Evaluation rows, the last one kept for each (method, setting, step): a resumed run repeats a few."""
    rows = read_jsonl(jsonl, valid=lambda row: isinstance(row, dict) and all(is_number(row.get(k)) for k in EVAL_NUMBERS)
                      and isinstance(row.get("method"), str) and isinstance(row.get("setting"), str), what="an evaluation row")
    return list({(row["method"], row["setting"], row["step"]): row for row in rows}.values())


EVAL_NUMBERS = ("step", "n", "kl", "reward", "reward_se", "judge", "judge_se", "distinct", "reference_logp")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_report(run):
    cfg = run.cfg
    summary = json.dumps(read_stage_times(run), indent=1)
    rows, folders = [], []
    for name in cfg.method_list():
        for folder, params in METHODS[name].runs(cfg).items():
            folders.append(folder)
            if not is_done(run, folder, method_settings(run, name, params)):
                raise UserError(f"{run.path(folder)} is not done with these settings; run --stage methods first")
            rows += sorted(read_rows(os.path.join(run.path(folder), "eval.jsonl")), key=lambda r: r["step"])
    final = {}
    for row in rows:  # the last step of each series
        key = (row["method"], row["setting"])
        if key not in final or row["step"] >= final[key]["step"]:
            final[key] = row
    times = read_stage_times(run)
    rm = times.get("rm")
    lines = [] if rm is None else [f"RLHF's Bradley-Terry reward model (rm.pt): pair accuracy {rm['rm_heldout_acc']:.3f} "
                                   f"held out, {rm['rm_train_acc']:.3f} on training pairs"]
    lines += [f"RSO ({folder}): acceptance rate {times[folder]['rso_acceptance_rate']:.3f}, {times[folder]['rso_pairs']} pairs"
              for folder in folders if "rso_acceptance_rate" in times.get(folder, {})]
    table_text = "\n".join(frontier_table(final.values()) + [""] + kl_budget_table(rows) + [""] + implicit_table(rows) + lines)
    print(table_text)
    # a handful of completions of the same test prefixes before (SFT) and after DPO (the first beta)
    enc = get_encoding()
    prompts = run.evaluator.prompts[:5]
    sections = [("SFT", load_model(run.path("sft.pt")))]
    first_dpo = os.path.join(run.path(f"dpo_beta{cfg.beta_list()[0]:g}"), "dpo.pt")
    if "dpo" in cfg.method_list() and os.path.exists(first_dpo):
        sections.append((f"DPO beta={cfg.beta_list()[0]:g}", load_model(first_dpo)))
    lines = []
    for name, model in sections:
        generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
        completions = generate(model.to(run.device).eval(), prompts, cfg.max_new_tokens, stop_at_eot=False, generator=generator)
        scores = run.evaluator.reward_model.score([p + c for p, c in zip(prompts, completions)])
        lines.append(name)  # [reward] prefix|completion, one line each
        lines += [f"[{s:.2f}] {enc.decode(p)}|{enc.decode(c)}".replace("\n", "\\n") for p, c, s in zip(prompts, completions, scores)]
    samples = "\n".join(lines)
    print(samples)
    # written once everything is read: a report that fails leaves the last one whole
    write_jsonl(run.path("results.jsonl"), rows)
    plot_frontier(rows, run.path("frontier.png"))
    atomic_write(run.path("report.md"), lambda f: f.write(
        f"# Results\n\n{table_text}\n\nstage summary: {summary}\n\n"
        f"# Samples\n\n[reward] prefix|completion\n```\n{samples}\n```\n".encode()))
    return {}


def frontier_table(rows):
    """The final point of each method: reward and second judge with their standard errors, and the
    degeneration signals (distinct-token ratio, mean per-token log-prob under the reference)."""
    lines = ["| method | setting | step | n | KL | reward | judge | distinct | ref logp |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['step']} | {r['n']} | "
              f"{shown_kl(r['kl'], 2)} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['judge']:.3f} ± {r['judge_se']:.3f} | "
              f"{r['distinct']:.2f} | {r['reference_logp']:.2f} |" for r in rows]
    return lines


def implicit_table(rows):
    """Eq. 5 measured: how often beta log(pi / pi_ref) orders held-out and training pairs as the ground
    truth does, for each method with a reference (DPO, IPO, KTO)."""
    lines = ["| method | setting | step | implicit-reward accuracy, held-out pairs | on training pairs |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['step']} | {r['implicit_acc_heldout']:.3f} | {r['implicit_acc_train']:.3f} |"
              for r in rows if "implicit_acc_heldout" in r]
    return lines


KL_BUDGETS = (3, 6, 12)


def kl_budget_table(rows):
    """Each method's best mean reward among its points (every setting and evaluation) with KL at most
    3, 6 and 12 nats. The best of several noisy points leans high by about a standard error."""
    lines = ["| method | " + " | ".join(f"best reward at KL <= {b}" for b in KL_BUDGETS) + " |", "|---|" + "---|" * len(KL_BUDGETS)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for budget in KL_BUDGETS:
            best = max((r for r in rows if r["method"] == method and r["kl"] <= budget), key=lambda r: r["reward"], default=None)
            cells.append("-" if best is None else f"{best['reward']:.3f} ± {best['reward_se']:.3f} (KL {shown_kl(best['kl'], 1)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def read_stage_times(run):
    path = run.path("stage_times.json")
    if not os.path.exists(path):
        return {}
    return read_json(path, valid=lambda times: isinstance(times, dict) and all(
        isinstance(t, dict) and all(isinstance(v, (int, float, str, dict)) for v in t.values())
        and is_number(t.get("seconds")) and t["seconds"] >= 0 for t in times.values()),
        what="a table of stage times")


def forget_times(run, names):
    """Drop these stages' or runs' entries from OUT/stage_times.json: their artifacts are being redone or removed."""
    times = read_stage_times(run)
    if any(name in times for name in names):
        save_json(run.path("stage_times.json"), {k: v for k, v in times.items() if k not in names})


def record_time(run, name, seconds, result):
    """A stage's or method's wall time and throughput, with the hardware, into OUT/stage_times.json."""
    times = read_stage_times(run)
    times[name] = {"seconds": round(seconds, 1), **result, "device": run.device, "hardware": hardware_name(run.device)}
    save_json(run.path("stage_times.json"), times)
    rates = "".join(f", {k} {v:.3g}" for k, v in result.items() if k.endswith(("_per_s", "mfu")))
    print0(f"=== {name}: {seconds:.0f}s{rates}")


def throughput(log_paths, key, prefix):
    """The median rate (and MFU, on GPU) over the trainers' progress lines: the median, because
    the lines of evaluation steps include the evaluation's time."""
    rows = [row for log_path in log_paths if os.path.exists(log_path) for row in read_jsonl(log_path)]
    result = {}
    for name in (key, "mfu"):
        values = [row[name] for row in rows if name in row]
        if values:
            result[prefix + name] = float(np.median(values))
    return result


# ---------------------------------------------------------------------------- the tables
@dataclass
class Stage:
    run: Callable  # run(run) -> numbers for stage_times.json
    artifacts: list  # what it writes under OUT (--force, or changed settings, remove them first); None: not recorded
    fields: tuple  # the TrainConfig fields its artifacts depend on, besides those of the stages before it


@dataclass
class Method:
    run: Callable  # run(run, folder, **params) -> numbers for stage_times.json; evaluations go to folder/eval.jsonl
    runs: Callable  # runs(cfg) -> {folder under OUT: params}, one per setting (DPO: one per beta)
    fields: tuple  # the TrainConfig fields its runs depend on, besides those of the stages before it


STAGES = {
    "sft": Stage(run_sft, ["sft.pt", "sft_log.jsonl"],
                 ("seed", "init", "n_layer", "n_head", "n_embd", "block_size", "sft_steps", "sft_batch_size",
                  "sft_grad_accum", "sft_lr", "sft_min_lr")),
    "reward": Stage(lambda run: run_classifier(run, "reward", reward_config(run.cfg)), ["reward.pt", "reward_log.jsonl"],
                    ("reward_steps", "reward_lr", "reward_order", "reward_bits", "reward_test_reviews")),
    "pairs": Stage(run_pairs, ["pairs.jsonl", "heldout_pairs.jsonl"],
                   ("n_prefixes", "heldout_prefixes", "completions_per_prefix", "max_new_tokens", "sample_batch_size")),
    "rm": Stage(run_rm, ["rm.pt", "rm_log.jsonl"], ("rm_epochs", "rm_batch_size", "rm_lr")),
    # after pairs: the judge only evaluates, so a change to it redoes the evaluations, not the pairs
    "judge": Stage(lambda run: run_classifier(run, "judge", judge_config(run.cfg)), ["judge.pt", "judge_log.jsonl"],
                   ("judge_steps", "judge_batch_size", "judge_lr", "judge_max_len", "judge_test_reviews")),
    "methods": Stage(run_methods, None, ("eval_prefixes",)),  # None: each run of each method is recorded on its own
    "report": Stage(run_report, None, ()),  # None: cheap, so always redone, its files replaced whole
}

DPO_FIELDS = ("dpo_steps", "dpo_batch_size", "dpo_micro_batch_size", "dpo_optimizer", "dpo_lr", "dpo_warmup_steps",
              "dpo_append_eot", "precompute_ref", "eval_interval")
PPO_FIELDS = ("ppo_steps", "ppo_batch_size", "ppo_minibatch_size", "ppo_epochs", "ppo_lr", "ppo_critic_lr", "ppo_init_kl_coef",
              "ppo_eval_interval")
METHODS = {
    "sft_point": Method(run_sft_point, lambda cfg: {"sft_point": {}}, ()),
    "preferred_ft": Method(run_preferred_ft, lambda cfg: {"preferred_ft": {}} if cfg.pft_steps else {},
                           ("pft_steps", "pft_lr")),
    "dpo": Method(functools.partial(run_preference_loss, method="DPO", loss_type="sigmoid", name="dpo"),
                  lambda cfg: {f"dpo_beta{beta:g}": {"beta": beta} for beta in cfg.beta_list()}, DPO_FIELDS),
    "unlikelihood": Method(functools.partial(run_preference_loss, method="Unlikelihood", loss_type="unlikelihood", name="unlikelihood"),
                           lambda cfg: {f"unlikelihood_alpha{a:g}": {"alpha": a} for a in cfg.number_list("ul_alphas")},
                           DPO_FIELDS),
    "ppo": Method(run_ppo, lambda cfg: {f"ppo_kl{t:g}": {"target_kl": t, "reward": "rm.pt"} for t in cfg.number_list("ppo_target_kls")},
                  PPO_FIELDS),
    "ppo_gt": Method(run_ppo, lambda cfg: {f"ppo_gt_kl{t:g}": {"target_kl": t, "reward": "reward.pt"}
                                           for t in cfg.number_list("ppo_target_kls")}, PPO_FIELDS),
    "best_of_n": Method(run_best_of_n, lambda cfg: {f"best_of_n{n:g}": {"n": int(n)} for n in cfg.number_list("bon_ns")}, ()),
    # the DPO family of the seeds' variants table, on the same pairs with DPO's settings
    "ipo": Method(functools.partial(run_preference_loss, method="IPO", loss_type="ipo", name="ipo"),
                  lambda cfg: {f"ipo_beta{cfg.ipo_beta:g}": {"beta": cfg.ipo_beta}}, DPO_FIELDS),
    "kto": Method(functools.partial(run_preference_loss, method="KTO", loss_type="kto", name="kto"),
                  lambda cfg: {f"kto_beta{cfg.kto_beta:g}": {"beta": cfg.kto_beta}}, DPO_FIELDS),
    "simpo": Method(functools.partial(run_preference_loss, method="SimPO", loss_type="simpo", name="simpo"),
                    lambda cfg: {f"simpo_beta{cfg.simpo_beta:g}_gamma{cfg.simpo_gamma:g}":
                                 {"beta": cfg.simpo_beta, "gamma": cfg.simpo_gamma}}, DPO_FIELDS),
    "orpo": Method(functools.partial(run_preference_loss, method="ORPO", loss_type="orpo", name="orpo"),
                   lambda cfg: {f"orpo_lambda{cfg.orpo_lambda:g}": {"lam": cfg.orpo_lambda}}, DPO_FIELDS),
    # the family's methods that make their own samples: online DPO, RSO, SPPO
    "online_dpo": Method(run_online_dpo, lambda cfg: {f"online_dpo_beta{beta:g}": {"beta": beta} for beta in cfg.beta_list()},
                         DPO_FIELDS + ("online_reward",)),
    "rso": Method(run_rso, lambda cfg: {f"rso_beta{beta:g}": {"beta": beta} for beta in cfg.beta_list()},
                  DPO_FIELDS + ("rso_prefixes", "rso_candidates", "rso_accept")),
    "sppo": Method(run_sppo, lambda cfg: {f"sppo_eta{cfg.sppo_eta:g}": {"eta": cfg.sppo_eta}},
                   DPO_FIELDS + ("online_reward", "sppo_iterations", "sppo_prompts", "sppo_samples")),
}
# --methods may name a group: the paper's Figure 2 (the default), or the DPO family
METHOD_GROUPS = {"figure2": ("sft_point", "preferred_ft", "dpo", "unlikelihood", "ppo", "ppo_gt", "best_of_n"),
                 "dpo-offline": ("sft_point", "dpo", "ipo", "kto", "simpo", "orpo"),
                 "dpo-online": ("sft_point", "dpo", "online_dpo", "rso", "sppo"),
                 "dpo-family": ("sft_point", "dpo", "ipo", "kto", "simpo", "orpo", "online_dpo", "rso", "sppo")}
# TrainConfig fields no artifact depends on: where and how the run goes, not what it computes
# (the sweeps, too: each of their values is a run of its own, recorded with its value)
NOT_RECORDED = ("out", "stage", "methods", "force", "data", "data_verify", "device", "compile", "betas", "ul_alphas",
                "ppo_target_kls", "bon_ns", "ipo_beta", "kto_beta", "simpo_beta", "simpo_gamma", "orpo_lambda", "sppo_eta")


# ---------------------------------------------------------------------------- the experiment's settings
@dataclass
class TrainConfig:
    out: str = field(default="out", metadata={"help": "run folder for every artifact"})
    stage: str = field(default="all", metadata={"help": "all | " + " | ".join(STAGES)})
    methods: str = field(default="figure2", metadata={"help": "figure2 (the paper's Figure 2), dpo-family (or its halves dpo-offline, dpo-online), all, or a comma-separated list of "
                                                                + ", ".join(METHODS)})
    force: bool = field(default=False, metadata={"help": "redo the stages that run, even if their artifacts exist"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder (else $IMDB_ARCHIVE, data/, download)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "random seed for every stage"})
    # 1. SFT
    init: str = field(default="scratch", metadata={"help": "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a save_pretrained folder | a .safetensors path"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks (scratch)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (scratch)"})
    n_embd: int = field(default=128, metadata={"help": "model width (scratch)"})
    block_size: int = field(default=64, metadata={"help": "SFT sequence length (also bounds prompt + completion)"})
    sft_steps: int = field(default=350, metadata={"help": "SFT optimizer steps"})
    sft_batch_size: int = field(default=16, metadata={"help": "SFT sequences per micro-batch"})
    sft_grad_accum: int = field(default=1, metadata={"help": "SFT micro-batches per step"})
    sft_lr: float = field(default=2e-3, metadata={"help": "SFT peak learning rate"})
    sft_min_lr: float = field(default=2e-4, metadata={"help": "SFT learning rate at the end of its cosine decay"})
    compile: bool = field(default=True, metadata={"help": "torch.compile SFT on CUDA"})
    # 2. the reward (an n-gram classifier) and the second judge (a GPT-trunk classifier)
    reward_steps: int = field(default=1600, metadata={"help": "reward: optimizer steps of 64 reviews"})
    reward_lr: float = field(default=5e-3, metadata={"help": "reward: Adam learning rate"})
    reward_order: int = field(default=4, metadata={"help": "reward: n-grams of 1..order tokens"})
    reward_bits: int = field(default=24, metadata={"help": "reward: 2**bits hashed n-gram weights"})
    reward_test_reviews: int = field(default=0, metadata={"help": "reward: test reviews for its accuracy (0 = all 25k)"})
    judge_steps: int = field(default=240, metadata={"help": "judge: optimizer steps"})
    judge_batch_size: int = field(default=32, metadata={"help": "judge: reviews per step"})
    judge_lr: float = field(default=3e-4, metadata={"help": "judge: peak learning rate"})
    judge_max_len: int = field(default=64, metadata={"help": "judge: longest training crop, in tokens"})
    judge_test_reviews: int = field(default=2000, metadata={"help": "judge: test reviews for its accuracy (0 = all 25k)"})
    # 3. preference pairs
    n_prefixes: int = field(default=1200, metadata={"help": "train prefixes (paper: 25,000)"})
    heldout_prefixes: int = field(default=50, metadata={"help": "test prefixes for the held-out pairs that measure DPO's implicit reward"})
    completions_per_prefix: int = field(default=4, metadata={"help": "samples per prefix (paper: 4 -> 6 pairs)"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens per sampled completion"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling batch"})
    # 4. DPO
    betas: str = field(default="0.1", metadata={"help": "comma-separated betas (paper: 0.05,0.1,1,5)"})
    dpo_steps: int = field(default=80, metadata={"help": "DPO optimizer steps per beta (0 = one epoch)"})
    dpo_batch_size: int = field(default=16, metadata={"help": "pairs per DPO step (paper: 64)"})
    dpo_micro_batch_size: int = field(default=16, metadata={"help": "pairs per forward pass"})
    dpo_optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop (paper) | adamw"})
    dpo_lr: float = field(default=3e-4, metadata={"help": "DPO learning rate (paper: 1e-6 for GPT-2-large)"})
    dpo_warmup_steps: int = field(default=10, metadata={"help": "DPO linear warm-up (paper: 150)"})
    dpo_append_eot: bool = field(default=False, metadata={"help": "end each pair's responses with end-of-text (off: the sampled completions are fixed-length and did not end)"})
    precompute_ref: bool = field(default=False, metadata={"help": "precompute reference log-probs of every pair once (worth it when the run sees most pairs; not for KTO)"})
    # 5. baselines
    pft_steps: int = field(default=20, metadata={"help": "Preferred-FT optimizer steps (0 = skip)"})
    pft_lr: float = field(default=1e-4, metadata={"help": "Preferred-FT learning rate"})
    ul_alphas: str = field(default="0.5", metadata={"help": "Unlikelihood: comma-separated alphas, each trained with DPO's settings (paper: 0.05,0.1,0.5,1)"})
    bon_ns: str = field(default="1,4,8", metadata={"help": "Best-of-N: comma-separated N (GPU preset: 1,4,16,64)"})
    # 6. RLHF: the Bradley-Terry reward model and PPO
    rm_epochs: float = field(default=1.0, metadata={"help": "reward model: passes over the training pairs"})
    rm_batch_size: int = field(default=32, metadata={"help": "reward model: pairs per step"})
    rm_lr: float = field(default=1e-4, metadata={"help": "reward model: peak learning rate"})
    ppo_target_kls: str = field(default="6", metadata={"help": "PPO and PPO-GT: comma-separated target KLs (paper: 3,6,9,12)"})
    ppo_steps: int = field(default=20, metadata={"help": "PPO steps (rollout batch + updates) per target KL"})
    ppo_batch_size: int = field(default=48, metadata={"help": "PPO rollouts per step (the paper's authors mention 1,024)"})
    ppo_minibatch_size: int = field(default=16, metadata={"help": "PPO rollouts per optimizer step"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO passes over each rollout batch"})
    ppo_lr: float = field(default=3e-4, metadata={"help": "PPO policy learning rate"})
    ppo_critic_lr: float = field(default=3e-3, metadata={"help": "PPO critic learning rate (10x the policy's)"})
    ppo_init_kl_coef: float = field(default=0.05, metadata={"help": "PPO beta_KL at the start; it adapts toward the target KL"})
    ppo_eval_interval: int = field(default=10, metadata={"help": "PPO steps between evaluations"})
    # 7. the DPO family (--methods dpo-family), each trained with DPO's settings
    ipo_beta: float = field(default=0.1, metadata={"help": "IPO: beta (its target margin is 1 / (2 beta))"})
    kto_beta: float = field(default=0.1, metadata={"help": "KTO: beta"})
    simpo_beta: float = field(default=2.0, metadata={"help": "SimPO: beta (SimPO's default 2.0)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO: target reward margin gamma (SimPO's default 0.5)"})
    orpo_lambda: float = field(default=0.1, metadata={"help": "ORPO: weight of the odds-ratio term (ORPO's default 0.1)"})
    online_reward: str = field(default="ground_truth", metadata={"help": "online DPO, SPPO: the labeller of their samples, ground_truth (reward.pt) | learned (rm.pt)"})
    rso_prefixes: int = field(default=240, metadata={"help": "RSO: training prefixes it samples (the first ones)"})
    rso_candidates: int = field(default=8, metadata={"help": "RSO: SFT samples per prefix to accept from (RSO: 64)"})
    rso_accept: int = field(default=4, metadata={"help": "RSO: samples of pi* accepted per prefix, all their pairs kept (RSO: 8)"})
    sppo_eta: float = field(default=10.0, metadata={"help": "SPPO: step size eta of the exponential-weights update"})
    sppo_iterations: int = field(default=4, metadata={"help": "SPPO: self-play iterations (SPPO: 3)"})
    sppo_prompts: int = field(default=160, metadata={"help": "SPPO: training prefixes sampled in each iteration"})
    sppo_samples: int = field(default=4, metadata={"help": "SPPO: completions K of each prefix from pi_t"})
    # 8. evaluation
    eval_interval: int = field(default=40, metadata={"help": "DPO steps between evaluations (paper: 100)"})
    eval_prefixes: int = field(default=96, metadata={"help": "held-out test prefixes per evaluation"})

    def validate(self):
        check(self.stage == "all" or self.stage in STAGES, f"--stage must be all or one of {', '.join(STAGES)}, got {self.stage!r}")
        unknown = [m for m in self.method_list() if m not in METHODS]
        check(self.method_list() and not unknown,
              f"--methods must be figure2, dpo-family, dpo-offline, dpo-online, all or a comma-separated list of {', '.join(METHODS)}, got {self.methods!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "sft_steps", "sft_batch_size", "sft_grad_accum",
                     "reward_steps", "judge_steps", "judge_batch_size", "judge_max_len", "n_prefixes", "heldout_prefixes",
                     "max_new_tokens",
                     "sample_batch_size", "dpo_batch_size", "dpo_micro_batch_size", "eval_interval", "eval_prefixes"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.dpo_batch_size % self.dpo_micro_batch_size == 0,
              f"--dpo-batch-size {self.dpo_batch_size} must be a multiple of --dpo-micro-batch-size {self.dpo_micro_batch_size}")
        check(self.completions_per_prefix >= 2, f"--completions-per-prefix must be at least 2, got {self.completions_per_prefix}")
        check(self.dpo_steps >= 0 and self.pft_steps >= 0 and self.reward_test_reviews >= 0 and self.judge_test_reviews >= 0,
              "step and review counts must be >= 0")
        check(self.sft_lr > 0 and self.reward_lr > 0 and self.judge_lr > 0 and self.dpo_lr > 0 and self.pft_lr > 0,
              "learning rates must be > 0")
        check(self.init != "scratch" or self.judge_max_len <= self.block_size,
              f"--judge-max-len {self.judge_max_len} exceeds the model's context --block-size {self.block_size}")
        check(8 + self.max_new_tokens <= self.block_size,
              f"an 8-token prefix plus --max-new-tokens {self.max_new_tokens} exceeds --block-size {self.block_size}")
        shortest_pft_text = self.n_prefixes * (2 + self.max_new_tokens + 1)  # best completions: prefix + sample + EOT
        check(self.pft_steps == 0 or shortest_pft_text > self.block_size + 1,
              f"Preferred-FT trains on windows of --block-size + 1 = {self.block_size + 1} tokens, but --n-prefixes "
              f"{self.n_prefixes} best completions may hold only {shortest_pft_text}; raise --n-prefixes or pass --pft-steps 0")
        for name in ("betas", "ul_alphas", "ppo_target_kls", "bon_ns"):
            flag = f"--{name.replace('_', '-')}"
            try:
                values = self.number_list(name)
            except ValueError:
                raise ValueError(f"{flag} must be comma-separated numbers, got {getattr(self, name)!r}") from None
            check(values and all(math.isfinite(v) and v > 0 for v in values), f"every value of {flag} must be finite and > 0, got {getattr(self, name)!r}")
            check(len({f"{v:g}" for v in values}) == len(values), f"{flag} names the same value twice: {getattr(self, name)!r}")
        check(all(n == int(n) for n in self.number_list("bon_ns")), f"--bon-ns must be whole numbers, got {self.bon_ns!r}")
        check(self.online_reward in ONLINE_REWARDS, f"--online-reward must be ground_truth or learned, got {self.online_reward!r}")
        check(0 < self.rso_prefixes <= self.n_prefixes and 2 <= self.rso_accept <= self.rso_candidates,
              f"RSO needs 0 < --rso-prefixes <= --n-prefixes and 2 <= --rso-accept <= --rso-candidates, got "
              f"{self.rso_prefixes}, {self.rso_accept}, {self.rso_candidates}")
        check(self.sppo_eta > 0 and self.sppo_iterations > 0 and self.sppo_prompts > 0 and self.sppo_samples >= 2,
              f"SPPO needs --sppo-eta, --sppo-iterations and --sppo-prompts > 0 and --sppo-samples >= 2, got {self.sppo_eta}, "
              f"{self.sppo_iterations}, {self.sppo_prompts}, {self.sppo_samples}")
        check(self.sppo_prompts * self.sppo_samples % (2 * self.dpo_batch_size) == 0,
              f"SPPO trains on 2 x --dpo-batch-size = {2 * self.dpo_batch_size} completions a step, which must divide an "
              f"iteration's --sppo-prompts x --sppo-samples = {self.sppo_prompts * self.sppo_samples}")
        check(self.ipo_beta > 0 and self.kto_beta > 0 and self.simpo_beta > 0,
              f"--ipo-beta, --kto-beta and --simpo-beta must be > 0, got {self.ipo_beta}, {self.kto_beta}, {self.simpo_beta}")
        check(self.orpo_lambda >= 0, f"--orpo-lambda must be >= 0, got {self.orpo_lambda}")
        check("kto" not in self.method_list() or self.dpo_micro_batch_size >= 2,
              f"KTO's KL estimate pairs each prompt with another pair's responses: --dpo-micro-batch-size must be at "
              f"least 2, got {self.dpo_micro_batch_size}")
        # each stage's own checks, now: a bad setting stops the run before anything is written or removed
        for stage_cfg, prefix in [(sft_config(self), "sft"), (reward_config(self), "reward"), (rm_config(self), "rm"),
                                  (judge_config(self), "judge"), *((dpo_config(self, "", b), "dpo") for b in self.beta_list()),
                                  *((ppo_config(self, "", t, "rm.pt"), "ppo") for t in self.number_list("ppo_target_kls")),
                                  (sppo_config(self, "", self.sppo_eta), "sppo"),
                                  *([(pft_config(self, ""), "pft")] if self.pft_steps else [])]:
            try:
                stage_cfg.validate()
            except ValueError as e:
                raise ValueError(train_flags(str(e), prefix)) from None

    def number_list(self, name):
        """A comma-separated sweep setting (betas, ul_alphas, ppo_target_kls, bon_ns) as floats."""
        return [float(v) for v in getattr(self, name).split(",") if v.strip()]

    def beta_list(self):
        return self.number_list("betas")

    def method_list(self):
        """The methods --methods names, a group (or all) expanded to its methods, each once."""
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        return list(dict.fromkeys(m for name in names for m in (METHODS if name == "all" else METHOD_GROUPS.get(name, [name]))))


# a stage script's settings under train.py's names: --epochs of ppo.py is --ppo-epochs here
FLAG_ALIASES = {"max_steps": "steps", "beta": "betas", "target_kl": "target_kls", "prompts_per_iteration": "prompts",
                "samples_per_prompt": "samples"}


def train_flags(message, prefix):
    """A stage script's error message with its flags (--epochs) renamed to train.py's (--ppo-epochs)."""
    names = {f.name for f in fields(TrainConfig)}

    def rename(match):
        name = match.group(1).replace("-", "_")
        for candidate in (f"{prefix}_{name}", f"{prefix}_{FLAG_ALIASES.get(name)}", name, FLAG_ALIASES.get(name)):
            if candidate in names:
                return "--" + candidate.replace("_", "-")
        return match.group(0)
    return re.sub(r"--([a-z][a-z-]*[a-z])", rename, message)


PRESETS = {
    "smoke": dict(n_layer=2, n_head=2, n_embd=64, block_size=48, sft_steps=20, sft_batch_size=8, reward_steps=20,
                  reward_bits=16, reward_test_reviews=32, judge_steps=20, judge_batch_size=16, judge_max_len=48,
                  judge_test_reviews=32, n_prefixes=16, heldout_prefixes=8, max_new_tokens=12,
                  betas="0.1,1", dpo_steps=6, dpo_batch_size=8, dpo_micro_batch_size=4, dpo_lr=1e-4,
                  dpo_warmup_steps=2, pft_steps=4, eval_interval=3, eval_prefixes=8, rm_epochs=1, rm_batch_size=8,
                  ppo_steps=2, ppo_batch_size=8, ppo_minibatch_size=4, ppo_eval_interval=2, bon_ns="1,2",
                  rso_prefixes=8, rso_candidates=4, rso_accept=2, sppo_iterations=2, sppo_prompts=8, sppo_samples=2),
    "cpu": dict(),  # the defaults above: 18.1 minutes (figure2) on the 2-core box of the README's CPU results
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, sft_steps=1500, sft_batch_size=64, sft_grad_accum=2,
                sft_lr=6e-4, sft_min_lr=6e-5, judge_steps=800, judge_batch_size=64, judge_lr=1e-4, judge_max_len=256,
                judge_test_reviews=0, n_prefixes=25_000, heldout_prefixes=1000, max_new_tokens=48, sample_batch_size=1024,
                betas="0.05,0.1,1,5", dpo_steps=600, dpo_batch_size=64, dpo_micro_batch_size=64, dpo_lr=1e-6,
                dpo_warmup_steps=150, pft_steps=300, pft_lr=1e-5, eval_interval=100, eval_prefixes=512,
                ul_alphas="0.05,0.1,0.5,1", bon_ns="1,4,16,64", rm_epochs=1, rm_batch_size=64, rm_lr=1e-5,
                ppo_target_kls="3,6,9,12", ppo_steps=100, ppo_batch_size=512, ppo_minibatch_size=64, ppo_lr=1e-5, ppo_critic_lr=1e-4,
                ppo_eval_interval=20, rso_prefixes=8000, rso_candidates=16, sppo_iterations=3, sppo_prompts=6400),
}


# ---------------------------------------------------------------------------- the run folder: what made each artifact
def stage_settings(run, name):
    """The settings a stage's artifacts are made with: the data, its own fields and those of every stage before it."""
    order = list(STAGES)
    settings = {"data": run.data_id}
    for stage in order[:order.index(name) + 1]:
        settings.update({f: getattr(run.cfg, f) for f in STAGES[stage].fields})
    return settings


def method_settings(run, name, params):
    return {**stage_settings(run, "methods"), **{f: getattr(run.cfg, f) for f in METHODS[name].fields}, **params}


def is_done(run, name, settings):
    record = run.records.get(name)
    return record is not None and record["done"] and record["settings"] == settings


def bring_up_to_date(run, name, stage, settings, artifacts, work):
    """work() -> its result, unless OUT/settings.json records `name` as done with these settings (then
    None). Before the work: artifacts made with other settings (or any, under --force) are removed, and
    so is everything made after this stage, from its old artifacts. The record is written before the
    work, so a killed run continues it, and marked done after."""
    cfg, record = run.cfg, run.records.get(name)
    if is_done(run, name, settings) and not cfg.force:
        print0(f"=== {name}: done already with these settings (in {cfg.out}; --force redoes it)")
        return None
    print0(f"=== {name}")
    stale = record is not None and record["settings"] != settings
    if stale:
        changed = [f"{k} {record['settings'].get(k)} -> {v}" for k, v in settings.items() if record["settings"].get(k) != v]
        print0(f"{name} was made with other settings ({', '.join(changed)}): redoing it")
    if cfg.force or stale:
        remove(cfg, artifacts)
    later = list(STAGES)[list(STAGES).index(stage) + 1:]
    made_from_old = [other for other, other_record in run.records.items() if other_record["stage"] in later]
    if made_from_old:
        print0(f"removing {', '.join(made_from_old)}: made from the {name} being redone, they are redone after it")
    for other in made_from_old:
        remove(cfg, owned_artifacts(other, run.records.pop(other)["stage"]))
    forget_times(run, [name, *made_from_old])
    run.records[name] = {"stage": stage, "settings": settings, "done": False}
    save_json(run.path("settings.json"), run.records)
    result = work()
    run.records[name]["done"] = True
    save_json(run.path("settings.json"), run.records)
    return result


def require_done(run, stages):
    """Running one stage alone: the stages before it must be done with these settings."""
    for stage in stages:
        if STAGES[stage].artifacts is not None and not is_done(run, stage, stage_settings(run, stage)):
            raise UserError(f"{run.cfg.out} holds no {stage} stage done with these settings; "
                            f"run --stage {stage} (or --stage all) first")


def check_inputs(run):
    """The checks that need the processes or open a file, made before anything is removed: a bad --init
    or a batch the ranks cannot share stops the run with OUT as it was."""
    cfg = run.cfg
    for flag, batch in (("--sft-batch-size", cfg.sft_batch_size), ("--judge-batch-size", cfg.judge_batch_size),
                        ("--rm-batch-size", cfg.rm_batch_size), ("--dpo-micro-batch-size", cfg.dpo_micro_batch_size)):
        check_divisible(batch, flag)
    sft_runs = cfg.stage in ("all", "sft") and (cfg.force or not is_done(run, "sft", stage_settings(run, "sft")))
    if cfg.init != "scratch" and sft_runs:
        build_model(sft_config(cfg), "cpu")  # the weights --init names load (then are freed), or the error says why


def read_records(path):
    """OUT/settings.json: {stage or method run: {"stage", "settings", "done"}}, or {} if there is none."""
    if not os.path.exists(path):
        return {}
    return read_json(path, valid=lambda records: isinstance(records, dict) and all(
        isinstance(r, dict) and r.get("stage") in STAGES and isinstance(r.get("settings"), dict)
        and isinstance(r.get("done"), bool) for r in records.values()), what="a record of this project's stages")


def owned_artifacts(name, stage):
    """What the record `name` of `stage` owns under OUT, from the code's own tables and never from the
    file: a stage's artifacts, or a method run's folder (a plain name: no path can leave OUT)."""
    if name in STAGES:
        return STAGES[name].artifacts or []
    return [name] if stage == "methods" and is_plain_name(name) else []


def remove(cfg, names):
    """Remove these artifacts under OUT (rank 0), so their stage or method runs again. Only a plain
    name directly inside OUT is ever removed; a link is unlinked, never followed."""
    for name in names:
        if not is_plain_name(name):
            raise UserError(f"refusing to remove {name!r}: it is not a plain name inside {cfg.out}")
        p = os.path.join(cfg.out, name)
        if is_main() and os.path.islink(p):
            os.remove(p)
        elif is_main() and os.path.isdir(p):
            shutil.rmtree(p)
        elif is_main() and os.path.exists(p):
            os.remove(p)
    barrier()


def main():
    cfg = parse_config(TrainConfig, presets=PRESETS, default_preset="gpu" if torch.cuda.is_available() else "cpu",
                       description=__doc__)
    device = setup_device(cfg.device)
    run = Run(cfg, load_imdb(cfg.data, verify=cfg.data_verify), device)
    check_inputs(run)
    if cfg.stage != "all":
        require_done(run, list(STAGES)[:list(STAGES).index(cfg.stage)])
    for name, stage in STAGES.items():
        if cfg.stage not in ("all", name):
            continue
        t0 = time.time()
        if stage.artifacts is None:
            print0(f"=== {name}")
            result = stage.run(run)
        else:
            result = bring_up_to_date(run, name, name, stage_settings(run, name), stage.artifacts, lambda: stage.run(run))
        barrier()
        if result is not None:
            record_time(run, name, time.time() - t0, result)
    print0("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in read_stage_times(run).items()))


if __name__ == "__main__":
    run_main(main)
