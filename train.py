"""
The paper's controlled-sentiment experiment (IMDb, Figure 2 left), end to end: the stages of STAGES
in order, then the runs of the methods of METHODS that --methods picks, then the report.

    python train.py                   # preset gpu when CUDA is present, else cpu
    python train.py --preset smoke    # seconds; numbers meaningless
    python train.py --stage methods --methods dpo --betas 0.1
    python train.py --methods dpo-family

Settings. TrainConfig holds the settings every stage shares (the model, the prompts, the seed) and
one section per stage or method file, that file's own config: --dpo-lr is DPOConfig.lr of dpo.py,
--ppo-epochs PPOConfig.epochs of ppo.py. train.py fills in only each section's "fixed" fields: the
paths inside OUT, the shared settings, and the value of a sweep (--betas gives DPOConfig.beta).

OUT/settings.json records, for each stage and each method run, the settings its artifacts were made
with. A stage or run already done with the current settings is skipped (a killed run continues where
it stopped); one made with other settings is redone, and so is everything after it. --force redoes
the ones that run, and --stage NAME runs one stage.
"""
import copy
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Callable

import numpy as np
import torch

from bradley_terry import BradleyTerryConfig, train_bradley_terry
from checkpoint import atomic_write, load_model, read_json, read_jsonl, save_json, write_jsonl
from cli import UserError, check, is_plain_name, parse_config, run_main, section_of
from data import EOT, get_encoding, load_imdb, make_prefixes
from device import barrier, check_divisible, hardware_name, is_main, local_slice, print0, rank, setup_device
from dpo import LOSSES, REFERENCE_FREE, DPOConfig, train_dpo
from evaluate import Evaluator, score_completions
from online import SPPOConfig, online_pairs, train_sppo
from pairs import RSOConfig, best_completions, rso_pairs, sample_and_label
from ppo import PPOConfig, train_ppo
from report import (comparison_table, frontier_table, implicit_table, is_number, kl_budget_table, over_seeds,
                    plot_curves, plot_frontier, read_rows)
from reward import RewardConfig, load_classifier, reward_function, train_reward
from roberta import folder_identity, is_roberta_folder
from sample import generate
from sft import SFTConfig, build_model, train_lm


# ---------------------------------------------------------------------------- the stages and the methods
@dataclass
class Stage:
    run: Callable  # run(run) -> numbers for stage_times.json
    artifacts: list  # what it writes under OUT (--force, or changed settings, remove them first); None: not recorded
    settings: tuple  # the TrainConfig settings (a section: all its own) its artifacts depend on, besides the earlier stages'


@dataclass
class Method:
    run: Callable  # run(run, folder, **params) -> numbers for stage_times.json; evaluations go to folder/eval.jsonl
    runs: Callable  # runs(cfg) -> {folder under OUT: params}, one per setting (DPO: one per beta)
    settings: tuple  # the TrainConfig settings (a section: all its own) its runs depend on, besides the stages'


def family_method(loss_type, loss):
    """A loss of dpo.LOSSES (IPO, ...) as a method: one run on DPO's pairs with DPO's settings and the
    loss's own, named by their values (simpo_beta2_gamma0.5)."""
    def runs(cfg):
        params = {name: getattr(cfg.family, f"{loss_type}_{name}") for name in loss.settings}
        return {loss_type + "".join(f"_{name}{value:g}" for name, value in params.items()): params}
    return Method(lambda run, folder, **params: run_preference_loss(run, folder, loss.method, loss_type, loss_type, **params),
                  runs, ("dpo",))


STAGES = {
    "sft": Stage(lambda run: run_sft(run), ["sft.pt", "sft_log.jsonl"],  # next-token training on IMDb reviews
                 ("seed", "init", "n_layer", "n_head", "n_embd", "block_size", "output_vocab", "sft")),
    "reward": Stage(lambda run: run_classifier(run, "reward", reward_config(run.cfg)),  # r(x, y), an n-gram classifier
                    ["reward.pt", "reward_log.jsonl"], ("reward",)),
    "pairs": Stage(lambda run: run_pairs(run), ["pairs.jsonl", "heldout_pairs.jsonl"],  # 4 SFT samples a prefix, 6 pairs
                   ("n_prefixes", "heldout_prefixes", "completions_per_prefix", "max_new_tokens", "sample_batch_size",
                    "ground_truth")),  # the labeller: a RoBERTa folder given by --ground-truth, recorded by its contents
    "rm": Stage(lambda run: run_rm(run), ["rm.pt", "rm_log.jsonl"], ("rm",)),  # RLHF's Bradley-Terry reward model
    # after pairs: the judge only evaluates, so a change to it redoes the evaluations, not the pairs
    "judge": Stage(lambda run: run_classifier(run, "judge", judge_config(run.cfg)),  # the second judge, a GPT trunk
                   ["judge.pt", "judge_log.jsonl"], ("judge",)),
    "methods": Stage(lambda run: run_methods(run), None, ("eval_prefixes",)),  # each run of each method recorded on its own
    "report": Stage(lambda run: run_report(run), None, ()),  # cheap, so always redone, its files replaced whole
}

FAMILY = {loss_type: loss for loss_type, loss in LOSSES.items() if loss.method}  # ipo, kto, simpo, orpo
METHODS = {  # each run writes OUT/<folder>/ with its eval.jsonl; the folders are named by the runs' settings
    "sft_point": Method(lambda run, folder: run_sft_point(run, folder), lambda cfg: {"sft_point": {}}, ()),
    "preferred_ft": Method(lambda run, folder: run_preferred_ft(run, folder),
                           lambda cfg: {"preferred_ft": {}} if cfg.pft.steps else {}, ("pft",)),
    "dpo": Method(lambda run, folder, beta: run_preference_loss(run, folder, "DPO", "sigmoid", "dpo", beta=beta),
                  lambda cfg: {f"dpo_beta{b:g}": {"beta": b} for b in cfg.number_list("betas")}, ("dpo",)),
    "unlikelihood": Method(lambda run, folder, alpha: run_preference_loss(run, folder, "Unlikelihood", "unlikelihood",
                                                                          "unlikelihood", alpha=alpha),
                           lambda cfg: {f"unlikelihood_alpha{a:g}": {"alpha": a} for a in cfg.number_list("ul_alphas")},
                           ("dpo",)),
    "ppo": Method(lambda run, folder, target_kl: run_ppo(run, folder, target_kl, ground_truth=False),
                  lambda cfg: {f"ppo_kl{t:g}": {"target_kl": t} for t in cfg.number_list("ppo_target_kls")}, ("ppo",)),
    "ppo_gt": Method(lambda run, folder, target_kl: run_ppo(run, folder, target_kl, ground_truth=True),
                     lambda cfg: {f"ppo_gt_kl{t:g}": {"target_kl": t} for t in cfg.number_list("ppo_target_kls")}, ("ppo",)),
    "best_of_n": Method(lambda run, folder, n: run_best_of_n(run, folder, n),
                        lambda cfg: {f"best_of_n{n:g}": {"n": int(n)} for n in cfg.number_list("bon_ns")}, ()),
    # the DPO family of the seeds' variants table on the same pairs with DPO's settings: one per loss of dpo.LOSSES
    # with a method name (ipo, kto, simpo, orpo), its settings flags of train.py (--simpo-gamma)
    **{loss_type: family_method(loss_type, loss) for loss_type, loss in FAMILY.items()},
    # the family's methods that make their own samples
    "online_dpo": Method(lambda run, folder, beta: run_online_dpo(run, folder, beta),
                         lambda cfg: {f"online_dpo_beta{b:g}": {"beta": b} for b in cfg.number_list("betas")},
                         ("dpo", "online_reward")),
    "rso": Method(lambda run, folder, beta: run_rso(run, folder, beta),
                  lambda cfg: {f"rso_beta{b:g}": {"beta": b} for b in cfg.number_list("betas")}, ("dpo", "rso")),
    "sppo": Method(lambda run, folder: run_sppo(run, folder), lambda cfg: {f"sppo_eta{cfg.sppo.eta:g}": {}},
                   ("sppo", "online_reward")),
}
# --methods may name a group: the paper's Figure 2 (the default), or the DPO family
METHOD_GROUPS = {"figure2": ("sft_point", "preferred_ft", "dpo", "unlikelihood", "ppo", "ppo_gt", "best_of_n"),
                 "dpo-offline": ("sft_point", "dpo", *FAMILY),
                 "dpo-online": ("sft_point", "dpo", "online_dpo", "rso", "sppo"),
                 "dpo-family": ("sft_point", "dpo", *FAMILY, "online_dpo", "rso", "sppo")}
# TrainConfig settings no artifact depends on: where and how the run goes, not what it computes (the
# sweeps and the family's settings, too: each value is a run of its own, recorded with its value)
NOT_RECORDED = ("out", "stage", "methods", "force", "data", "data_verify", "device", "compile", "betas", "ul_alphas",
                "ppo_target_kls", "bon_ns", "family", "seeds", "seed_scope")  # each seed's runs: their seed recorded
ONLINE_REWARDS = ("ground_truth", "learned")  # --online-reward: the labeller of new samples, ground truth or rm.pt
SEED_SCOPES = ("methods", "all")  # --seed-scope: what a further seed redoes


# ---------------------------------------------------------------------------- the experiment's settings
MODEL = ("init", "n_layer", "n_head", "n_embd", "block_size", "output_vocab")  # the model's settings, shared by every stage
WHERE = ("out", "name", "seed", "device")  # every section's fixed fields: train.py fills them in


def section(config, fixed=(), help=""):
    """A TrainConfig field that is a stage's or method's own config, the cpu preset's values given
    here; `fixed` names its fields that train.py fills in (not flags, not recorded)."""
    own = {f.name for f in fields(config)}
    return field(default_factory=lambda: replace(config), metadata={"help": help, "fixed": tuple(f for f in WHERE + fixed if f in own)})


# the settings of each loss of dpo.LOSSES run as a method (ipo, kto, simpo, orpo), a flag each: --simpo-gamma
FamilyConfig = make_dataclass("FamilyConfig", [
    (f"{loss_type}_{name}", float, field(default=value, metadata={"help": f"{loss.method}: {name} (dpo.py --{name})"}))
    for loss_type, loss in LOSSES.items() for name, value in loss.settings.items()])


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
    compile: bool = field(default=True, metadata={"help": "torch.compile SFT on CUDA"})
    seed: int = field(default=0, metadata={"help": "random seed for every stage"})
    seeds: int = field(default=1, metadata={"help": "training runs of each method, with seeds seed, seed + 1, ...: the "
                                                    "report gives their mean and 95%% interval, and says which differences they show"})
    seed_scope: str = field(default="methods", metadata={"help": "what each further seed redoes: methods (the methods' "
                            "training, on the same SFT model, reward and pairs) | all (every stage too, in OUT/seed<k>/)"})
    # the model
    init: str = field(default="scratch", metadata={"help": "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a save_pretrained folder | a .safetensors path"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks (scratch)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (scratch)"})
    n_embd: int = field(default=128, metadata={"help": "model width (scratch)"})
    block_size: int = field(default=64, metadata={"help": "SFT sequence length (also bounds prompt + completion)"})
    output_vocab: int = field(default=8192, metadata={"help": "the LM head scores only the K most frequent GPT-2 tokens of "
                              "IMDb's train text, K = this, and never emits the others (scratch; 0: all 50,257, as GPT-2 "
                              "and the gpu preset; a GPT-2 --init keeps its full head)"})
    # the prompts and their samples: the preference pairs, every method's samples, the evaluation
    n_prefixes: int = field(default=3000, metadata={"help": "train prefixes (paper: 25,000)"})
    heldout_prefixes: int = field(default=50, metadata={"help": "test prefixes for the held-out pairs that measure DPO's implicit reward"})
    completions_per_prefix: int = field(default=4, metadata={"help": "samples per prefix (paper: 4 -> 6 pairs)"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens per sampled completion"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling batch"})
    eval_prefixes: int = field(default=256, metadata={"help": "held-out test prefixes per evaluation"})
    # the sweeps and the DPO family's settings: each value is a run of its own
    betas: str = field(default="0.1", metadata={"help": "DPO, online DPO, RSO: comma-separated betas (paper: 0.05,0.1,1,5)"})
    ul_alphas: str = field(default="0.5", metadata={"help": "Unlikelihood: comma-separated alphas, each trained with DPO's settings (paper: 0.05,0.1,0.5,1)"})
    ppo_target_kls: str = field(default="6", metadata={"help": "PPO and PPO-GT: comma-separated target KLs (paper: 3,6,9,12)"})
    bon_ns: str = field(default="1,4,8", metadata={"help": "Best-of-N: comma-separated N (GPU preset: 1,4,16,64)"})
    family: FamilyConfig = field(default_factory=FamilyConfig, metadata={
        "flat": True, "help": "the DPO family's settings, from dpo.LOSSES: each loss one run with these values"})
    online_reward: str = field(default="ground_truth", metadata={"help": "online DPO, SPPO: the labeller of their samples, ground_truth | learned (rm.pt)"})
    ground_truth: str = field(default="", metadata={"help": "a RoBERTa sentiment classifier's save_pretrained folder (the "
                              "paper's: siebert/sentiment-roberta-large-english) as the ground truth r(x, y) wherever it is "
                              "used, in place of the reward stage's n-gram classifier (empty: the n-gram)"})
    # each stage's and method's own settings: its file's config (the cpu preset's values)
    sft: SFTConfig = section(SFTConfig(steps=1400, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=70, log_interval=70,
                                       eval_interval=350, save_interval=350), fixed=MODEL + ("data", "data_verify", "compile"),
                             help="SFT on IMDb reviews (sft.py)")
    reward: RewardConfig = section(RewardConfig(kind="ngram", steps=1600, lr=5e-3, log_interval=160),
                                   fixed=("kind", "sft", "data", "data_verify", "warmup_steps", "weight_decay",
                                          "grad_clip", "save_interval"),  # the last four: the gpt kind's only
                                   help="the ground-truth reward r(x, y), an n-gram classifier (reward.py)")
    judge: RewardConfig = section(RewardConfig(kind="gpt", max_len=64, batch_size=32, steps=240, lr=3e-4, warmup_steps=24,
                                               test_reviews=2000, log_interval=24, save_interval=60),
                                  fixed=("kind", "sft", "data", "data_verify", "order", "bits", "nb_scale"),  # ngram's only
                                  help="the second judge, a GPT-trunk classifier (reward.py)")
    rm: BradleyTerryConfig = section(BradleyTerryConfig(epochs=1.0, batch_size=32, lr=1e-4), fixed=("sft", "pairs", "heldout"),
                                     help="RLHF's Bradley-Terry reward model on the pairs (bradley_terry.py)")
    pft: SFTConfig = section(SFTConfig(steps=20, batch_size=16, lr=1e-4, min_lr=1e-4, warmup_steps=1, log_interval=4,
                                       eval_interval=20, eval_batches=2, save_interval=20, compile=False),
                             fixed=MODEL + ("data", "data_verify"),
                             help="Preferred-FT, SFT on the best completion of each prefix (sft.py; --pft-steps 0 skips it)")
    dpo: DPOConfig = section(DPOConfig(batch_size=16, micro_batch_size=16, optimizer="rmsprop", lr=1e-4, warmup_steps=10,
                                       steps=480, append_eot=False, log_interval=16, eval_interval=80, save_interval=80),
                             fixed=("sft", "pairs", "beta", "loss_type", "alpha", "gamma", "lam", "skip_bad_lines"),
                             help="DPO (dpo.py), and Unlikelihood, IPO, KTO, SimPO, ORPO, online DPO and RSO trained with it")
    ppo: PPOConfig = section(PPOConfig(steps=20, batch_size=48, minibatch_size=16, epochs=2, lr=3e-4, critic_lr=3e-3,
                                       init_kl_coef=0.05, norm_samples=48, eval_interval=10, save_interval=10),
                             fixed=("sft", "reward", "data", "data_verify", "n_prefixes", "max_new_tokens", "target_kl"),
                             help="PPO and PPO-GT (ppo.py)")
    rso: RSOConfig = section(RSOConfig(), help="RSO's rejection sampling (pairs.py)")
    sppo: SPPOConfig = section(SPPOConfig(iterations=4, prompts_per_iteration=160, samples_per_prompt=4, batch_size=32,
                                          optimizer="rmsprop", lr=3e-4, warmup_steps=10, log_interval=8, eval_interval=2),
                               fixed=("sft", "reward", "max_new_tokens"), help="SPPO (online.py)")

    def validate(self):
        check(self.stage == "all" or self.stage in STAGES, f"--stage must be all or one of {', '.join(STAGES)}, got {self.stage!r}")
        unknown = [m for m in self.method_list() if m not in METHODS]
        check(self.method_list() and not unknown,
              f"--methods must be figure2, dpo-family, dpo-offline, dpo-online, all or a comma-separated list of {', '.join(METHODS)}, got {self.methods!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "n_prefixes", "heldout_prefixes", "max_new_tokens",
                     "sample_batch_size", "eval_prefixes"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.seeds >= 1 and self.seed + self.seeds <= 2**32,
              f"--seeds must be at least 1 (and --seed + --seeds at most 2^32), got {self.seeds}")
        check(self.seed_scope in SEED_SCOPES, f"--seed-scope must be one of {', '.join(SEED_SCOPES)}, got {self.seed_scope!r}")
        check(self.completions_per_prefix >= 2, f"--completions-per-prefix must be at least 2, got {self.completions_per_prefix}")
        check(self.init != "scratch" or self.judge.max_len <= self.block_size,
              f"--judge-max-len {self.judge.max_len} exceeds the model's context --block-size {self.block_size}")
        check(8 + self.max_new_tokens <= self.block_size,
              f"an 8-token prefix plus --max-new-tokens {self.max_new_tokens} exceeds --block-size {self.block_size}")
        shortest_pft_text = self.n_prefixes * (2 + self.max_new_tokens + 1)  # best completions: prefix + sample + EOT
        check(self.pft.steps >= 0, f"--pft-steps must be >= 0, got {self.pft.steps}")
        check(self.pft.steps == 0 or shortest_pft_text > self.block_size + 1,
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
        check(not self.ground_truth or is_roberta_folder(self.ground_truth),
              f"--ground-truth {self.ground_truth}: not a RoBERTa save_pretrained folder (config.json and vocab.json)")
        check(self.rso.prefixes <= self.n_prefixes, f"RSO needs 0 < --rso-prefixes <= --n-prefixes, got {self.rso.prefixes}")
        check("kto" not in self.method_list() or self.dpo.micro_batch_size >= 2,
              f"KTO's KL estimate pairs each prompt with another pair's responses: --dpo-micro-batch-size must be at "
              f"least 2, got {self.dpo.micro_batch_size}")
        # each section's own checks, as train.py will run it: a bad setting stops the run before anything is written
        for name, config in [("sft", sft_config(self)), ("reward", reward_config(self)), ("rm", rm_config(self)),
                             ("judge", judge_config(self)), *(("dpo", dpo_config(self, "", b)) for b in self.number_list("betas")),
                             *((loss_type, loss_config(self, "", loss_type, loss_type, **params))
                               for loss_type in FAMILY for params in METHODS[loss_type].runs(self).values()),
                             *(("ppo", ppo_config(self, "", t, os.path.join(self.out, "rm.pt"))) for t in self.number_list("ppo_target_kls")),
                             ("rso", self.rso), ("sppo", sppo_config(self, "")),
                             *([("pft", pft_config(self, ""))] if self.pft.steps else [])]:
            try:
                config.validate()
            except ValueError as e:
                raise ValueError(train_flags(str(e), name)) from None

    def number_list(self, name):
        """A comma-separated sweep setting (betas, ul_alphas, ppo_target_kls, bon_ns) as floats."""
        return [float(v) for v in getattr(self, name).split(",") if v.strip()]

    def method_list(self):
        """The methods --methods names, a group (or all) expanded to its methods, each once."""
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        return list(dict.fromkeys(m for name in names for m in (METHODS if name == "all" else METHOD_GROUPS.get(name, [name]))))


PRESETS = {  # by flag: sft_steps is --sft-steps, TrainConfig.sft.steps
    "smoke": dict(n_layer=2, n_head=2, n_embd=64, block_size=48, output_vocab=512, n_prefixes=16, heldout_prefixes=8, max_new_tokens=12,
                  eval_prefixes=8, betas="0.1,1", bon_ns="1,2",
                  sft_steps=20, sft_batch_size=8, sft_warmup_steps=1, sft_log_interval=1, sft_eval_interval=5,
                  sft_save_interval=5, reward_steps=20, reward_bits=16, reward_test_reviews=32, reward_log_interval=2,
                  judge_steps=20, judge_batch_size=16, judge_max_len=48, judge_test_reviews=32, judge_warmup_steps=2,
                  judge_log_interval=2, judge_save_interval=5, rm_epochs=1, rm_batch_size=8,
                  pft_steps=4, pft_batch_size=8, pft_log_interval=1, pft_eval_interval=4, pft_save_interval=4,
                  dpo_steps=6, dpo_batch_size=8, dpo_micro_batch_size=4, dpo_lr=1e-4, dpo_warmup_steps=2,
                  dpo_log_interval=1, dpo_eval_interval=3, dpo_save_interval=3,
                  ppo_steps=2, ppo_batch_size=8, ppo_minibatch_size=4, ppo_norm_samples=8, ppo_eval_interval=2,
                  ppo_save_interval=2, rso_prefixes=8, rso_candidates=4, rso_accept=2,
                  sppo_iterations=2, sppo_prompts_per_iteration=8, sppo_samples_per_prompt=2, sppo_batch_size=16,
                  sppo_lr=1e-4, sppo_warmup_steps=2, sppo_log_interval=1, sppo_eval_interval=3),
    "cpu": dict(),  # the defaults above: 10.3 minutes (figure2, one seed) on the 2-core box of the README's CPU results
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, output_vocab=0, n_prefixes=25_000, heldout_prefixes=1000,
                max_new_tokens=48, sample_batch_size=1024, eval_prefixes=512,
                betas="0.05,0.1,1,5", ul_alphas="0.05,0.1,0.5,1", bon_ns="1,4,16,64", ppo_target_kls="3,6,9,12",
                sft_steps=1500, sft_batch_size=64, sft_grad_accum=2, sft_lr=6e-4, sft_min_lr=6e-5, sft_warmup_steps=75,
                sft_log_interval=75, sft_eval_interval=375, sft_save_interval=375,
                judge_steps=800, judge_batch_size=64, judge_lr=1e-4, judge_max_len=256, judge_test_reviews=0,
                judge_warmup_steps=80, judge_log_interval=80, judge_save_interval=200,
                rm_epochs=1, rm_batch_size=64, rm_lr=1e-5,
                pft_steps=300, pft_batch_size=64, pft_lr=1e-5, pft_min_lr=1e-5, pft_log_interval=60, pft_eval_interval=300,
                pft_save_interval=300,
                dpo_steps=600, dpo_batch_size=64, dpo_micro_batch_size=64, dpo_lr=1e-6, dpo_warmup_steps=150,
                dpo_log_interval=20, dpo_eval_interval=100, dpo_save_interval=100,
                ppo_steps=100, ppo_batch_size=512, ppo_minibatch_size=64, ppo_lr=1e-5, ppo_critic_lr=1e-4,
                ppo_norm_samples=512, ppo_eval_interval=20, ppo_save_interval=20, rso_prefixes=8000, rso_candidates=16,
                sppo_iterations=3, sppo_prompts_per_iteration=6400, sppo_batch_size=128, sppo_lr=1e-6,
                sppo_warmup_steps=150, sppo_log_interval=20, sppo_eval_interval=1),
}


# ---------------------------------------------------------------------------- each section as it runs
# A section with its fixed fields filled in: the paths inside OUT, the model, the seed and the device.
def where(cfg, out, name):
    return dict(out=out, name=name, seed=cfg.seed, device=cfg.device)


def sft_config(cfg):
    model = {k: getattr(cfg, k) for k in MODEL} | {"output_vocab": cfg.output_vocab if cfg.init == "scratch" else 0}
    return replace(cfg.sft, **where(cfg, cfg.out, "sft"), **model, data=cfg.data, compile=cfg.compile)


def pft_config(cfg, folder):
    return replace(cfg.pft, **where(cfg, folder, "preferred_ft"), init=os.path.join(cfg.out, "sft.pt"),
                   block_size=cfg.block_size)


def reward_config(cfg):
    return replace(cfg.reward, **where(cfg, cfg.out, "reward"), kind="ngram", data=cfg.data)


def judge_config(cfg):
    return replace(cfg.judge, **where(cfg, cfg.out, "judge"), kind="gpt", sft=os.path.join(cfg.out, "sft.pt"), data=cfg.data)


def rm_config(cfg):
    return replace(cfg.rm, **where(cfg, cfg.out, "rm"), sft=os.path.join(cfg.out, "sft.pt"),
                   pairs=os.path.join(cfg.out, "pairs.jsonl"), heldout=os.path.join(cfg.out, "heldout_pairs.jsonl"))


def dpo_config(cfg, folder, beta, pairs=None, name="dpo"):
    return replace(cfg.dpo, **where(cfg, folder, name), sft=os.path.join(cfg.out, "sft.pt"),
                   pairs=pairs or os.path.join(cfg.out, "pairs.jsonl"), beta=beta)


def loss_config(cfg, folder, loss_type, name, pairs=None, online=False, **loss_settings):
    """The dpo section with another loss of dpo.LOSSES and its settings (beta 1 for a loss without one).
    The reference is live for KTO (its mismatched rows) and online DPO (its new samples)."""
    return replace(dpo_config(cfg, folder, loss_settings.get("beta", 1.0), pairs, name), loss_type=loss_type,
                   precompute_ref=cfg.dpo.precompute_ref and loss_type != "kto" and not online, **loss_settings)


def ppo_config(cfg, folder, target_kl, reward):
    return replace(cfg.ppo, **where(cfg, folder, "ppo"), sft=os.path.join(cfg.out, "sft.pt"), reward=reward,
                   max_new_tokens=cfg.max_new_tokens, target_kl=target_kl)


def ground_truth_path(cfg):
    """The ground truth r(x, y): the RoBERTa folder of --ground-truth, else the reward stage's n-gram classifier."""
    return cfg.ground_truth or os.path.join(cfg.out, "reward.pt")


def online_reward(cfg):
    """The labeller of online DPO's and SPPO's samples (--online-reward): the ground truth, or RLHF's rm.pt."""
    return ground_truth_path(cfg) if cfg.online_reward == "ground_truth" else os.path.join(cfg.out, "rm.pt")


def sppo_config(cfg, folder):
    return replace(cfg.sppo, **where(cfg, folder, "sppo"), sft=os.path.join(cfg.out, "sft.pt"),
                   reward=online_reward(cfg),
                   max_new_tokens=cfg.max_new_tokens)


def train_flags(message, section_name):
    """A section's error message with its flags (--epochs) renamed to train.py's (--ppo-epochs)."""
    names = {f.name for f in fields(TrainConfig)} | {s.name if f.metadata.get("flat") else f"{f.name}_{s.name}"
                                                     for f in fields(TrainConfig) if section_of(f) for s in fields(section_of(f))
                                                     if s.name not in f.metadata.get("fixed", ())}  # the flags train.py has
    sweeps = {"beta": "betas", "alpha": "ul_alphas", "target_kl": "ppo_target_kls"}  # fields a sweep gives

    def rename(match):
        name = match.group(1).replace("-", "_")
        for candidate in (f"{section_name}_{name}", name, sweeps.get(name)):
            if candidate in names:
                return "--" + candidate.replace("_", "-")
        return match.group(0)
    return re.sub(r"--([a-z][a-z-]*[a-z])", rename, message)


# ---------------------------------------------------------------------------- the run
class Run:
    """What every stage and method is handed: the config, the tokenized data, the device, and the
    evaluator, built on first use (it needs the models of the sft and reward stages). eval_seed: the
    seed of the evaluation's prompts and samples, the same for every seed of --seeds."""

    def __init__(self, cfg, imdb, device, eval_seed=None):
        self.cfg, self.imdb, self.device = cfg, imdb, device
        self.eval_seed = cfg.seed if eval_seed is None else eval_seed
        self.suffix = ""  # a view of seeded(k): its runs' folder suffix, _seed<k>
        self.loaded = {}  # the evaluator and the learned reward, loaded once and shared by every seed's view
        # the prompts, made here so that a data set too small for the settings is refused before any work
        self.train_prompts = self.prefixes("train", cfg.n_prefixes, cfg.seed, "--n-prefixes")
        self.eval_prompts = self.prefixes("test", cfg.eval_prefixes, self.eval_seed + 1, "--eval-prefixes")
        # the held-out preference set: test prefixes only, none equal to a training prefix
        train = {tuple(p) for p in self.train_prompts}
        self.heldout_prompts = [p for p in self.prefixes("test", cfg.heldout_prefixes, cfg.seed + 2, "--heldout-prefixes")
                                if tuple(p) not in train]
        if not self.heldout_prompts:
            raise UserError(f"all {cfg.heldout_prefixes} held-out test prefixes equal training prefixes; raise --heldout-prefixes")
        for flag, n in (("--reward-test-reviews", cfg.reward.test_reviews), ("--judge-test-reviews", cfg.judge.test_reviews)):
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

    def seeded(self, offset):
        """This run as the method runs of seed offset k see it (--seeds, --seed-scope methods): the same
        stages, data, evaluator and folder, cfg.seed + k for their training, and their folders ending
        in _seed<k> (seed offset 0: the one-seed run's own folders)."""
        if offset == 0:
            return self
        view = copy.copy(self)
        view.cfg, view.suffix = replace(self.cfg, seed=self.cfg.seed + offset), f"_seed{offset}"
        return view

    @property
    def evaluator(self):
        if "evaluator" not in self.loaded:
            cfg = self.cfg
            train_pairs = read_jsonl(self.path("pairs.jsonl"))
            sampled = {tuple(p) for p in self.train_prompts[:cfg.heldout_prefixes]}  # as many training prefixes as held out
            preference_sets = {"heldout": read_jsonl(self.path("heldout_pairs.jsonl")),
                               "train": [p for p in train_pairs if tuple(p["prompt_ids"]) in sampled]}
            self.loaded["evaluator"] = Evaluator(
                load_model(self.path("sft.pt")).to(self.device).eval(), self.ground_truth,
                load_classifier(self.path("judge.pt")).to(self.device), self.eval_prompts, cfg.max_new_tokens,
                cfg.sample_batch_size, self.eval_seed, preference_sets)
        return self.loaded["evaluator"]

    @property
    def ground_truth(self):
        """The ground truth r(x, y) (ground_truth_path), loaded once: the pairs, the evaluator and the
        up-front check of a --ground-truth folder share it."""
        if "ground_truth" not in self.loaded:
            self.loaded["ground_truth"] = load_classifier(ground_truth_path(self.cfg)).to(self.device)
        return self.loaded["ground_truth"]

    @property
    def learned_reward(self):
        """RLHF's Bradley-Terry reward r(x, y) from rm.pt, loaded once for every Best-of-N and RSO run."""
        if "learned_reward" not in self.loaded:
            self.loaded["learned_reward"] = reward_function(self.path("rm.pt"), self.device)
        return self.loaded["learned_reward"]

    @functools.cached_property
    def data_id(self):
        """The tokenized IMDb's contents, for the records: the same data under any path is the same run."""
        h = hashlib.sha256()
        for split in sorted(self.imdb):
            for array in (self.imdb[split].tokens, self.imdb[split].offsets, self.imdb[split].labels):
                h.update(np.ascontiguousarray(array).data)
        return "sha256:" + h.hexdigest()[:16]


# ---------------------------------------------------------------------------- stages
def run_sft(run):
    train_tokens = np.concatenate([run.imdb["train"].tokens, run.imdb["unsup"].tokens])  # test is held out
    train_lm(sft_config(run.cfg), train_tokens, run.imdb["test"].tokens)
    return throughput([run.path("sft_log.jsonl")], "tok_per_s", "sft_")


def run_classifier(run, name, config):
    """The reward model or the second judge: two classifiers of different kinds on the same labels."""
    _, accuracy = train_reward(config, run.imdb)
    return {**{f"{name}_{k}": v for k, v in accuracy.items()},
            **throughput([run.path(f"{name}_log.jsonl")], "reviews_per_s", f"{name}_")}


def run_pairs(run):
    cfg = run.cfg
    policy = load_model(run.path("sft.pt")).to(run.device).eval()
    reward_model = run.ground_truth
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


def run_rm(run):
    """RLHF's reward model, Bradley-Terry on the training pairs; its held-out pair accuracy is the
    number to set beside DPO's implicit-reward accuracy."""
    _, accuracy = train_bradley_terry(rm_config(run.cfg))
    return {"rm_heldout_acc": accuracy["heldout_acc"], "rm_train_acc": accuracy["train_acc"], "rm_step": accuracy["step"],
            **throughput([run.path("rm_log.jsonl")], "pairs_per_s", "rm_")}


def run_methods(run):
    """Every run of every chosen method, for each seed of --seed-scope methods, not done yet with these
    settings, each timed into stage_times.json."""
    for seeded in seed_views(run):
        for name in run.cfg.method_list():
            for folder, (settings, params) in method_runs(seeded, name).items():
                t0 = time.time()
                result = bring_up_to_date(run, folder, "methods", settings, [folder],
                                          lambda: METHODS[name].run(seeded, run.path(folder), **params))
                if result is not None:
                    record_time(run, folder, time.time() - t0, result)
    return None  # each run recorded its own time


def seed_views(run):
    """The run as each seed's method runs see it: one per seed under --seed-scope methods (whose further
    seeds share OUT), else the run alone (under --seed-scope all each seed is a whole run of its own)."""
    return [run.seeded(k) for k in range(run.cfg.seeds if run.cfg.seed_scope == "methods" else 1)]


def seed_runs(run):
    """(k, the run whose OUT holds seed k's method runs, seed k's view) for each seed of --seeds: under
    --seed-scope methods every seed's runs are in OUT; under all, seed k's whole run is in OUT/seed<k>/
    (seed 0's in OUT), with the evaluation's prompts and sampling seed of seed 0."""
    if run.cfg.seed_scope == "methods":
        return [(k, run, view) for k, view in enumerate(seed_views(run))]
    runs = [run] + [Run(replace(run.cfg, seed=run.cfg.seed + k, out=run.path(f"seed{k}")), run.imdb, run.device,
                        eval_seed=run.cfg.seed) for k in range(1, run.cfg.seeds)]
    return [(k, seeded, seeded) for k, seeded in enumerate(runs)]


def method_runs(run, name):
    """{folder: (recorded settings, params)} of a method's runs as `run`, a seed's view, makes them
    (its settings hold its own seed, cfg.seed + k)."""
    return {folder + run.suffix: (method_settings(run, name, params), params) for folder, params in METHODS[name].runs(run.cfg).items()}


# ---------------------------------------------------------------------------- methods
# Each method trains (or not) from the SFT model and appends its evaluations to FOLDER/eval.jsonl.
def run_sft_point(run, folder):
    """The SFT model itself: the reference, at KL = 0."""
    run.evaluator(load_model(run.path("sft.pt")).to(run.device), "SFT", "", 0, os.path.join(folder, "eval.jsonl"))
    return {}


def run_preferred_ft(run, folder):
    """Preferred-FT: SFT continued on the best-rewarded completion of each training prefix."""
    sequences = best_completions(read_jsonl(run.path("pairs.jsonl")))
    stream = np.array([t for sequence in sequences for t in sequence + [EOT]], dtype=np.uint16)
    pft_path = train_lm(pft_config(run.cfg, folder), stream, stream)
    run.evaluator(load_model(pft_path).to(run.device), "Preferred-FT", "", run.cfg.pft.steps, os.path.join(folder, "eval.jsonl"))
    return throughput([os.path.join(folder, "preferred_ft_log.jsonl")], "tok_per_s", "preferred_ft_")


def run_preference_loss(run, folder, method, loss_type, name, pairs=None, sample_pairs=None, **loss_settings):
    """A loss of dpo.py on the offline pairs: DPO itself, its family (IPO, KTO, SimPO, ORPO) or the
    Unlikelihood baseline, each trained exactly as DPO is (the dpo section: dpo.py's trainer, DPO's
    steps, batch, optimizer and lr) and evaluated every --dpo-eval-interval steps. The losses with a
    reference also report the implicit reward's accuracy, beta log(pi / pi_ref) (Eq. 5). pairs: another
    pair file (RSO's); sample_pairs: pairs sampled as it trains instead (online DPO)."""
    log = os.path.join(folder, "eval.jsonl")
    config = loss_config(run.cfg, folder, loss_type, name, pairs, online=sample_pairs is not None, **loss_settings)
    setting = ", ".join(f"{k}={v:g}" for k, v in loss_settings.items())
    implicit_beta = None if loss_type in REFERENCE_FREE else config.beta
    train_dpo(config, sample_pairs=sample_pairs,
              evaluate=lambda step, policy: run.evaluator(policy, method, setting, step, log, implicit_beta=implicit_beta))
    return throughput([os.path.join(folder, f"{name}_log.jsonl")], "pairs_per_s", f"{name}_")


def online_method(cfg, name):
    """Online DPO's and SPPO's label on the frontier: the labeller is named when it is the learned reward model."""
    return name if cfg.online_reward == "ground_truth" else f"{name} (learned RM)"


def run_online_dpo(run, folder, beta):
    """Online DPO (online.py): DPO's trainer and settings, each step's pairs sampled from the policy
    itself and labelled by --online-reward (the ground truth by default)."""
    cfg = run.cfg
    reward_fn = reward_function(online_reward(cfg), run.device)
    sampler = functools.partial(online_pairs, prompts=run.train_prompts, reward_fn=reward_fn, batch_size=cfg.dpo.batch_size,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return run_preference_loss(run, folder, online_method(cfg, "Online DPO"), "sigmoid", "online_dpo",
                               sample_pairs=sampler, beta=beta)


def run_rso(run, folder, beta):
    """RSO: DPO at beta on pairs of samples of pi* = pi_ref exp(r / beta) / Z (Eq. 4) instead of the
    SFT model's: --rso-candidates SFT samples of each of --rso-prefixes training prefixes, --rso-accept
    of them accepted by rejection sampling under the learned reward (rm.pt), and every pair of those,
    labelled by the ground truth (pairs.rso_pairs)."""
    cfg = run.cfg
    sampling, rso_pairs_path = os.path.join(folder, "rso_sampling.json"), os.path.join(folder, "rso_pairs.jsonl")
    # the sampling record is written after the pairs: a run killed while sampling, or one whose pairs were deleted, samples again
    if not (os.path.exists(sampling) and os.path.exists(rso_pairs_path)):
        policy = load_model(run.path("sft.pt")).to(run.device).eval()
        pairs, rate = rso_pairs(policy, run.learned_reward, run.evaluator.reward_model, run.train_prompts[:cfg.rso.prefixes],
                                cfg.rso.candidates, cfg.rso.accept, beta, cfg.max_new_tokens, cfg.sample_batch_size, cfg.seed)
        write_jsonl(rso_pairs_path, pairs)
        save_json(sampling, {"acceptance_rate": rate, "pairs": len(pairs)})
    accepted = read_json(sampling)
    print0(f"RSO beta={beta:g}: acceptance rate {accepted['acceptance_rate']:.3f} (one in {1 / accepted['acceptance_rate']:.1f} "
           f"SFT samples is a sample of pi*), {accepted['pairs']} pairs")
    result = run_preference_loss(run, folder, "RSO", "sigmoid", "rso", pairs=rso_pairs_path, beta=beta)
    return {**result, "rso_acceptance_rate": accepted["acceptance_rate"], "rso_pairs": accepted["pairs"]}


def run_sppo(run, folder):
    """SPPO (online.py): --sppo-iterations of self-play from the SFT model, each on
    --sppo-prompts-per-iteration training prefixes with --sppo-samples-per-prompt completions each,
    win rates from --online-reward's logit."""
    cfg = run.cfg
    log = os.path.join(folder, "eval.jsonl")
    train_sppo(sppo_config(cfg, folder), run.train_prompts,
               evaluate=lambda step, policy: run.evaluator(policy, online_method(cfg, "SPPO"), f"eta={cfg.sppo.eta:g}", step, log))
    return throughput([os.path.join(folder, "sppo_log.jsonl")], "samples_per_s", "sppo_")


def run_ppo(run, folder, target_kl, ground_truth):
    """PPO (ppo.py) on the training prefixes toward one target KL: on the learned Bradley-Terry reward
    (rm.pt: the paper's PPO) or on the ground truth itself (PPO-GT)."""
    method, reward = ("PPO-GT", ground_truth_path(run.cfg)) if ground_truth else ("PPO", run.path("rm.pt"))
    log = os.path.join(folder, "eval.jsonl")
    train_ppo(ppo_config(run.cfg, folder, target_kl, reward), run.train_prompts,
              evaluate=lambda step, policy: run.evaluator(policy, method, f"target KL={target_kl:g}", step, log))
    return throughput([os.path.join(folder, "ppo_log.jsonl")], "samples_per_s", "ppo_")


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
    point, samples = score_completions(prompts, [candidates[i * n + j] for i, j in enumerate(best)], evaluator.reference,
                                       evaluator.reward_model, evaluator.judge, kl=math.log(n) - (n - 1) / n)
    evaluator.record(point, samples, "Best-of-N", f"N={n}", 0, os.path.join(folder, "eval.jsonl"))
    return {}


# ---------------------------------------------------------------------------- report
def run_report(run):
    """Every chosen method's evaluations, of every seed: the tables (report.py) printed and written to
    report.md with a few samples, results.jsonl (one row per evaluation and seed), frontier.png."""
    cfg = run.cfg
    times = read_stage_times(run)
    summary = json.dumps(times, indent=1)
    rows, lines, curves = [], [], {}
    for seed, owner, view in seed_runs(run):
        owner_times = read_stage_times(owner)
        for name in cfg.method_list():
            for folder, (settings, _) in method_runs(view, name).items():
                if not is_done(owner, folder, settings):
                    raise UserError(f"{owner.path(folder)} is not done with these settings; run --stage methods first")
                evaluations = sorted(read_rows(os.path.join(owner.path(folder), "eval.jsonl"), seed), key=lambda r: r["step"])
                rows += evaluations
                logs = sorted(glob.glob(os.path.join(glob.escape(owner.path(folder)), "*_log.jsonl")))  # its trainer's log
                curves[os.path.relpath(owner.path(folder), cfg.out)] = ([r for log in logs for r in read_jsonl(log)], evaluations)
                sampled = owner_times.get(folder, {})
                if "rso_acceptance_rate" in sampled:
                    lines.append(f"RSO ({os.path.relpath(owner.path(folder), cfg.out)}): acceptance rate "
                                 f"{sampled['rso_acceptance_rate']:.3f}, "
                                 f"{sampled['rso_pairs']} pairs")
    means = over_seeds(rows)
    scorer = f"RoBERTa classifier {cfg.ground_truth}" if cfg.ground_truth else "n-gram classifier, reward.pt"
    lines.insert(0, f"ground truth r(x, y): the {scorer}; second judge: the GPT-trunk classifier, judge.pt")
    rm = times.get("rm")
    if rm is not None:
        lines.insert(1, f"RLHF's Bradley-Terry reward model (rm.pt): pair accuracy {rm['rm_heldout_acc']:.3f} held out, "
                        f"{rm['rm_train_acc']:.3f} on training pairs")
    table_text = "\n".join(frontier_table(means) + [""] + kl_budget_table(rows) + [""] + comparison_table(rows) + [""]
                           + implicit_table(means) + lines)
    print(table_text)
    # a handful of completions of the same test prefixes before (SFT) and after DPO (the first beta, the first seed)
    enc = get_encoding()
    prompts = run.evaluator.prompts[:5]
    sections = [("SFT", load_model(run.path("sft.pt")))]
    first_beta = cfg.number_list("betas")[0]
    first_dpo = os.path.join(run.path(f"dpo_beta{first_beta:g}"), "dpo.pt")
    if "dpo" in cfg.method_list() and os.path.exists(first_dpo):
        sections.append((f"DPO beta={first_beta:g}", load_model(first_dpo)))
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
    plot_frontier(means, run.path("frontier.png"), scorer)
    plot_curves(curves, run.path("curves.png"))
    atomic_write(run.path("report.md"), lambda f: f.write(
        f"# Results\n\n{table_text}\n\nstage summary: {summary}\n\n"
        f"# Samples\n\n[reward] prefix|completion\n```\n{samples}\n```\n".encode()))
    return {}


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


# ---------------------------------------------------------------------------- the run folder: what made each artifact
def recorded(cfg, names):
    """The settings these TrainConfig names stand for: a setting itself, or each of a section's own
    (not fixed) settings, as "section.field"."""
    result = {}
    for f in fields(TrainConfig):
        if f.name in names and section_of(f) is None:
            result[f.name] = getattr(cfg, f.name)
        elif f.name in names:
            result.update({f"{f.name}.{k}": v for k, v in asdict(getattr(cfg, f.name)).items() if k not in f.metadata["fixed"]})
    return result


def stage_settings(run, name):
    """The settings a stage's artifacts are made with: the data, its own and those of every stage before it."""
    order = list(STAGES)
    settings = {"data": run.data_id, **recorded(run.cfg, [s for stage in order[:order.index(name) + 1] for s in STAGES[stage].settings])}
    if settings.get("ground_truth"):  # a folder stands for its contents: moved, it is the same; changed, it is not
        settings["ground_truth"] = folder_identity(settings["ground_truth"])
    elif "ground_truth" in settings:  # the n-gram classifier: the reward stage's settings say what it is
        del settings["ground_truth"]
    return settings


def method_settings(run, name, params):
    return {**stage_settings(run, "methods"), **recorded(run.cfg, METHODS[name].settings), **params}


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
    save_records(run)
    result = work()
    run.records[name]["done"] = True
    save_records(run)
    return result


def require_done(run, stages):
    """Running one stage alone: the stages before it must be done with these settings."""
    for stage in stages:
        if STAGES[stage].artifacts is not None and not is_done(run, stage, stage_settings(run, stage)):
            raise UserError(f"{run.cfg.out} holds no {stage} stage done with these settings; "
                            f"run --stage {stage} (or --stage all) first")


def check_inputs(run):
    """The checks that need the processes or open a file, made before anything is removed: a bad --init or
    --ground-truth, a batch the ranks cannot share or a damaged stage_times.json stops the run with OUT as it was."""
    cfg = run.cfg
    for flag, batch in (("--sft-batch-size", cfg.sft.batch_size), ("--judge-batch-size", cfg.judge.batch_size),
                        ("--rm-batch-size", cfg.rm.batch_size), ("--dpo-micro-batch-size", cfg.dpo.micro_batch_size)):
        check_divisible(batch, flag)
    read_stage_times(run)  # a damaged stage_times.json is said now, not after a stage was removed
    sft_runs = cfg.stage in ("all", "sft") and (cfg.force or not is_done(run, "sft", stage_settings(run, "sft")))
    if cfg.init != "scratch" and sft_runs:
        build_model(sft_config(cfg), "cpu")  # the weights --init names load (then are freed), or the error says why
    if cfg.ground_truth:
        run.ground_truth  # the folder's tensors, names, shapes and vocabulary checked (and kept), or the error says why


RECORDS_FORMAT = 2  # 2: settings by section ("dpo.lr"); 1 (no "format" key): one flat list of flags


def read_records(path):
    """OUT/settings.json: {stage or method run: {"stage", "settings", "done"}}, or {} if there is none."""
    if not os.path.exists(path):
        return {}
    saved = read_json(path, valid=lambda saved: isinstance(saved, dict) and isinstance(saved.get("records", {}), dict) and all(
        isinstance(r, dict) and r.get("stage") in STAGES and isinstance(r.get("settings"), dict)
        and isinstance(r.get("done"), bool) for r in saved.get("records", saved).values()), what="a record of this project's stages")
    if saved.get("format") != RECORDS_FORMAT:
        raise UserError(f"{path} was written by an older train.py, whose settings this one cannot compare; "
                        f"pass another --out, or remove {os.path.dirname(path) or '.'} to start over")
    return saved["records"]


def save_records(run):
    save_json(run.path("settings.json"), {"format": RECORDS_FORMAT, "records": run.records})


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
    runs = [owner for _, owner, _ in seed_runs(run)] if cfg.seed_scope == "all" else [run]  # each with its own stages
    for each in runs:
        check_inputs(each)
        if cfg.stage != "all":
            require_done(each, list(STAGES)[:list(STAGES).index(cfg.stage)])
    stages = [name for name in STAGES if cfg.stage in ("all", name)]
    for each in runs:  # every seed's stages (--seed-scope all), then the report of them all
        for k, name in enumerate(stages, 1):
            if name != "report":
                print0(f"--- stage {k}/{len(stages)}: {name}" + (f" ({each.cfg.out})" if len(runs) > 1 else ""))
                run_stage(each, name)
    if "report" in stages:
        print0(f"--- stage {len(stages)}/{len(stages)}: report")
        run_stage(run, "report")
    print0("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in read_stage_times(run).items()))
    if "report" in stages:
        print0(f"the frontier: {run.path('frontier.png')}, the training curves: {run.path('curves.png')}, the tables and "
               f"samples: {run.path('report.md')}, every point: {run.path('results.jsonl')}")


def run_stage(run, name):
    """One stage, skipped if done with these settings, its time recorded in stage_times.json."""
    stage, t0 = STAGES[name], time.time()
    if stage.artifacts is None:
        print0(f"=== {name}")
        result = stage.run(run)
    else:
        result = bring_up_to_date(run, name, name, stage_settings(run, name), stage.artifacts, lambda: stage.run(run))
    barrier()
    if result is not None:
        record_time(run, name, time.time() - t0, result)


if __name__ == "__main__":
    run_main(main)
