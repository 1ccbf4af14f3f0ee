"""
The paper's controlled-sentiment experiment (IMDb, Figure 2 left), end to end:

  1. sft       next-token training on IMDb reviews                       -> OUT/sft.pt
  2. reward    sentiment classifier r(x, y) = P(positive | x + y)        -> OUT/reward.pt
  3. pairs     4 SFT samples per train prefix, all 6 pairs, labelled by r -> OUT/pairs.jsonl
  4. dpo       DPO for each beta, evaluated every eval_interval steps      -> OUT/dpo_beta*/
  5. baselines the SFT model itself and Preferred-FT, evaluated the same way
  6. report    results.jsonl, frontier.png, a summary table, samples before/after DPO

Each stage skips when its artifact exists (a killed run continues where it stopped), --force
redoes the stages that run, and --stage NAME runs one.

    python train.py                   # preset gpu when CUDA is present, else cpu
    python train.py --preset smoke    # seconds; numbers meaningless
"""
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import common
from common import UserError, check
from data import EOT, get_encoding, load_imdb, make_prefixes
from dpo import DPOConfig, train_dpo
from evaluate import evaluate_policy, plot_frontier
from reward import RESUME_FIELDS as REWARD_RUN_FIELDS, RewardConfig, load_reward_model, train_reward
from sample import generate
from sft import RESUME_FIELDS as SFT_RUN_FIELDS, SFTConfig, train_lm

STAGES = ("sft", "reward", "pairs", "dpo", "baselines", "report")


@dataclass
class TrainConfig:
    out: str = field(default="out", metadata={"help": "run folder for every artifact"})
    stage: str = field(default="all", metadata={"help": "all | " + " | ".join(STAGES)})
    force: bool = field(default=False, metadata={"help": "redo the stages that run, even if their artifacts exist"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder (else $IMDB_ARCHIVE, data/, download)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "random seed for every stage"})
    # 1. SFT
    init: str = field(default="scratch", metadata={"help": "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | .safetensors path"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks (scratch)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (scratch)"})
    n_embd: int = field(default=128, metadata={"help": "model width (scratch)"})
    block_size: int = field(default=64, metadata={"help": "SFT sequence length (also bounds prompt + completion)"})
    sft_steps: int = field(default=350, metadata={"help": "SFT optimizer steps"})
    sft_batch_size: int = field(default=16, metadata={"help": "SFT sequences per micro-batch"})
    sft_grad_accum: int = field(default=1, metadata={"help": "SFT micro-batches per step"})
    sft_lr: float = field(default=2e-3, metadata={"help": "SFT peak learning rate"})
    compile: bool = field(default=True, metadata={"help": "torch.compile SFT on CUDA"})
    # 2. reward model
    reward_steps: int = field(default=500, metadata={"help": "classifier optimizer steps"})
    reward_batch_size: int = field(default=32, metadata={"help": "reviews per classifier step"})
    reward_lr: float = field(default=3e-4, metadata={"help": "classifier peak learning rate"})
    reward_max_len: int = field(default=64, metadata={"help": "tokens of each review the classifier reads"})
    reward_test_reviews: int = field(default=2000, metadata={"help": "test reviews for its accuracy (0 = all 25k)"})
    # 3. preference pairs
    n_prefixes: int = field(default=400, metadata={"help": "train prefixes (paper: 25,000)"})
    completions_per_prefix: int = field(default=4, metadata={"help": "samples per prefix (paper: 4 -> 6 pairs)"})
    max_new_tokens: int = field(default=24, metadata={"help": "tokens per sampled completion"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling batch"})
    # 4. DPO
    betas: str = field(default="0.1,1", metadata={"help": "comma-separated betas (paper: 0.05,0.1,1,5)"})
    dpo_steps: int = field(default=100, metadata={"help": "DPO optimizer steps per beta (0 = one epoch)"})
    dpo_batch_size: int = field(default=16, metadata={"help": "pairs per DPO step (paper: 64)"})
    dpo_micro_batch_size: int = field(default=16, metadata={"help": "pairs per forward pass"})
    dpo_optimizer: str = field(default="rmsprop", metadata={"help": "rmsprop (paper) | adamw"})
    dpo_lr: float = field(default=5e-5, metadata={"help": "DPO learning rate (paper: 1e-6 for GPT-2-large)"})
    dpo_warmup_steps: int = field(default=10, metadata={"help": "DPO linear warm-up (paper: 150)"})
    precompute_ref: bool = field(default=False, metadata={"help": "precompute reference log-probs once"})
    # 5. baselines
    pft_steps: int = field(default=60, metadata={"help": "Preferred-FT optimizer steps (0 = skip)"})
    pft_lr: float = field(default=1e-4, metadata={"help": "Preferred-FT learning rate"})
    # 6. evaluation
    eval_interval: int = field(default=25, metadata={"help": "DPO steps between evaluations (paper: 100)"})
    eval_prefixes: int = field(default=64, metadata={"help": "held-out test prefixes per evaluation"})

    def validate(self):
        check(self.stage in ("all",) + STAGES, f"--stage must be all or one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "sft_steps", "sft_batch_size", "sft_grad_accum",
                     "reward_steps", "reward_batch_size", "reward_max_len", "n_prefixes", "max_new_tokens",
                     "sample_batch_size", "dpo_batch_size", "dpo_micro_batch_size", "eval_interval", "eval_prefixes"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.completions_per_prefix >= 2, f"--completions-per-prefix must be at least 2, got {self.completions_per_prefix}")
        check(self.dpo_steps >= 0 and self.pft_steps >= 0 and self.reward_test_reviews >= 0, "step counts must be >= 0")
        check(self.sft_lr > 0 and self.reward_lr > 0 and self.dpo_lr > 0 and self.pft_lr > 0, "learning rates must be > 0")
        check(8 + self.max_new_tokens <= self.block_size,
              f"an 8-token prefix plus --max-new-tokens {self.max_new_tokens} exceeds --block-size {self.block_size}")
        shortest_pft_text = self.n_prefixes * (2 + self.max_new_tokens + 1)  # best completions: prefix + sample + EOT
        check(self.pft_steps == 0 or shortest_pft_text > self.block_size + 1,
              f"Preferred-FT trains on windows of --block-size + 1 = {self.block_size + 1} tokens, but --n-prefixes "
              f"{self.n_prefixes} best completions may hold only {shortest_pft_text}; raise --n-prefixes or pass --pft-steps 0")
        try:
            betas = self.beta_list()
        except ValueError:
            raise ValueError(f"--betas must be comma-separated numbers, got {self.betas!r}") from None
        check(betas and all(b > 0 for b in betas), f"every beta must be > 0, got {self.betas!r}")

    def beta_list(self):
        return [float(b) for b in self.betas.split(",") if b.strip()]


PRESETS = {
    "smoke": dict(n_layer=2, n_head=2, n_embd=64, block_size=48, sft_steps=20, sft_batch_size=8, reward_steps=20,
                  reward_batch_size=16, reward_max_len=48, reward_test_reviews=64, n_prefixes=16, max_new_tokens=12,
                  betas="0.1,1", dpo_steps=6, dpo_batch_size=8, dpo_micro_batch_size=4, dpo_lr=1e-4,
                  dpo_warmup_steps=2, pft_steps=4, eval_interval=3, eval_prefixes=8),
    "cpu": dict(),  # the defaults above: about 12 minutes on a 2-core CPU
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, sft_steps=1500, sft_batch_size=64, sft_grad_accum=2,
                sft_lr=6e-4, reward_steps=800, reward_batch_size=64, reward_lr=1e-4, reward_max_len=256,
                reward_test_reviews=0, n_prefixes=25_000, max_new_tokens=48, sample_batch_size=1024,
                betas="0.05,0.1,1,5", dpo_steps=600, dpo_batch_size=64, dpo_micro_batch_size=64, dpo_lr=1e-6,
                dpo_warmup_steps=150, pft_steps=300, pft_lr=1e-5, eval_interval=100, eval_prefixes=512),
}


# ---------------------------------------------------------------------------- stages
def sft_config(cfg):
    sft_cfg = SFTConfig(out=cfg.out, name="sft", data=cfg.data, init=cfg.init, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, block_size=cfg.block_size, batch_size=cfg.sft_batch_size,
                        grad_accum=cfg.sft_grad_accum, max_steps=cfg.sft_steps, lr=cfg.sft_lr, min_lr=cfg.sft_lr / 10,
                        warmup_steps=max(1, cfg.sft_steps // 20), log_interval=max(1, cfg.sft_steps // 20),
                        eval_interval=max(1, cfg.sft_steps // 4), save_interval=max(1, cfg.sft_steps // 4),
                        seed=cfg.seed, device=cfg.device, compile=cfg.compile)
    sft_cfg.validate()
    return sft_cfg


def stage_sft(cfg, imdb):
    train_tokens = np.concatenate([imdb["train"].tokens, imdb["unsup"].tokens])  # test is held out
    train_lm(sft_config(cfg), train_tokens, imdb["test"].tokens)
    return throughput([path(cfg, "sft_log.jsonl")], "tok_per_s", "sft_")


def reward_config(cfg):
    reward_cfg = RewardConfig(sft=path(cfg, "sft.pt"), out=cfg.out, data=cfg.data, max_len=cfg.reward_max_len,
                              batch_size=cfg.reward_batch_size, max_steps=cfg.reward_steps, lr=cfg.reward_lr,
                              warmup_steps=max(1, cfg.reward_steps // 10), test_reviews=cfg.reward_test_reviews,
                              log_interval=max(1, cfg.reward_steps // 10), save_interval=max(1, cfg.reward_steps // 4),
                              seed=cfg.seed, device=cfg.device)
    reward_cfg.validate()
    return reward_cfg


def stage_reward(cfg, imdb):
    _, accuracy = train_reward(reward_config(cfg), imdb)
    return {"reward_test_accuracy": accuracy, **throughput([path(cfg, "reward_log.jsonl")], "reviews_per_s", "reward_")}


def all_pairs(prompt, completions, rewards):
    """Every pair of distinct completions of one prompt, chosen = the higher reward (6 pairs from 4)."""
    pairs = []
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if completions[i] == completions[j]:
                continue  # identical samples carry no preference
            w, l = (i, j) if rewards[i] >= rewards[j] else (j, i)
            pairs.append({"prompt_ids": prompt, "chosen_ids": completions[w], "rejected_ids": completions[l],
                          "chosen_reward": float(rewards[w]), "rejected_reward": float(rewards[l])})
    return pairs


def stage_pairs(cfg, imdb, device):
    policy = common.load_model(path(cfg, "sft.pt")).to(device).eval()
    reward_model = load_reward_model(path(cfg, "reward.pt")).to(device)
    prompts = make_prefixes(imdb["train"], cfg.n_prefixes, seed=cfg.seed)
    k = cfg.completions_per_prefix
    generator = torch.Generator(device=device).manual_seed(cfg.seed + common.rank())
    t0 = time.time()
    repeated = [p for p in prompts for _ in range(k)]
    local = common.local_slice(repeated)  # under torchrun each rank samples a share
    completions = []
    for i in range(0, len(local), cfg.sample_batch_size):  # batches, with a progress line each
        completions += generate(policy, local[i:i + cfg.sample_batch_size], cfg.max_new_tokens,
                                stop_at_eot=False, generator=generator)
        done, elapsed = len(completions), time.time() - t0
        common.print0(f"pairs: sampled {done}/{len(local)} | {done * cfg.max_new_tokens / elapsed:.0f} tok/s | "
                      f"eta {common.format_seconds((len(local) - done) * elapsed / done)}")
    sample_time = time.time() - t0
    rewards = np.array(common.gather(reward_model.score([p + c for p, c in zip(local, completions)]).tolist()))
    completions = common.gather(completions)
    enc = get_encoding()
    pairs = []
    for n, prompt in enumerate(prompts):
        pairs += all_pairs(prompt, completions[n * k:(n + 1) * k], rewards[n * k:(n + 1) * k])
    for pair in pairs:  # readable text beside the exact ids (ids take precedence when read back)
        pair.update(prompt=enc.decode(pair["prompt_ids"]), chosen=enc.decode(pair["chosen_ids"]),
                    rejected=enc.decode(pair["rejected_ids"]))
    if common.is_main():
        common.atomic_write(path(cfg, "pairs.jsonl"), lambda f: f.write("".join(json.dumps(p) + "\n" for p in pairs).encode()))
    gap = float(np.mean([p["chosen_reward"] - p["rejected_reward"] for p in pairs]))
    common.print0(f"pairs: {len(pairs)} pairs from {len(prompts)} prefixes, mean reward {rewards.mean():.3f}, "
                  f"mean chosen-rejected reward gap {gap:.3f}")
    return {"pairs": len(pairs), "prefixes": len(prompts), "mean_reward_gap": gap, "sft_sample_reward": float(rewards.mean()),
            "sampling_tokens_per_s": len(repeated) * cfg.max_new_tokens / sample_time}


class Evaluator:
    """Scores a policy on the held-out prefixes and appends (method, beta, step, kl, reward) rows to a file."""

    def __init__(self, cfg, imdb, device):
        self.cfg = cfg
        self.reference = common.load_model(path(cfg, "sft.pt")).to(device).eval()
        self.reward_model = load_reward_model(path(cfg, "reward.pt")).to(device)
        self.prompts = make_prefixes(imdb["test"], cfg.eval_prefixes, seed=cfg.seed + 1)
        self.t0 = time.time()

    def __call__(self, policy, method, beta, step, log_path):
        metrics, completions = evaluate_policy(policy, self.reference, self.reward_model, self.prompts,
                                               self.cfg.max_new_tokens, self.cfg.sample_batch_size, seed=self.cfg.seed)
        row = {"method": method, "beta": beta, "step": step, **metrics, "wall_time": time.time() - self.t0}
        if common.is_main():
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        common.print0(f"eval {method} beta={beta} step {step}: reward {metrics['reward']:.3f} | kl {metrics['kl']:.3f}")
        return metrics, completions


def stage_dpo(cfg, evaluator):
    for beta in cfg.beta_list():
        run = path(cfg, f"dpo_beta{beta:g}")
        if os.path.exists(os.path.join(run, "done")):
            continue
        dpo_cfg = DPOConfig(sft=path(cfg, "sft.pt"), pairs=path(cfg, "pairs.jsonl"), out=run, beta=beta,
                            batch_size=cfg.dpo_batch_size, micro_batch_size=cfg.dpo_micro_batch_size,
                            optimizer=cfg.dpo_optimizer, lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup_steps,
                            max_steps=cfg.dpo_steps, append_eot=False, precompute_ref=cfg.precompute_ref,
                            log_interval=max(1, cfg.eval_interval // 5), eval_interval=cfg.eval_interval,
                            save_interval=cfg.eval_interval, seed=cfg.seed, device=cfg.device)
        dpo_cfg.validate()
        train_dpo(dpo_cfg, evaluate=lambda step, policy: evaluator(policy, "DPO", beta, step, os.path.join(run, "eval.jsonl"))[0])
        mark_done(os.path.join(run, "done"))
    return throughput([os.path.join(path(cfg, f"dpo_beta{b:g}"), "dpo_log.jsonl") for b in cfg.beta_list()],
                      "pairs_per_s", "dpo_")


def stage_baselines(cfg, evaluator, device):
    """The SFT model itself (the KL = 0 point) and Preferred-FT (SFT continued on the best sample per prefix)."""
    sft_model = common.load_model(path(cfg, "sft.pt")).to(device)
    log = path(cfg, "baselines_eval.jsonl")
    if os.path.exists(log) and common.is_main():
        os.remove(log)  # the baseline points are recomputed together
    common.barrier()
    evaluator(sft_model, "SFT", None, 0, log)
    if cfg.pft_steps:
        best = {}
        with open(path(cfg, "pairs.jsonl")) as f:
            for line in f:
                p = json.loads(line)
                key = tuple(p["prompt_ids"])
                if key not in best or p["chosen_reward"] > best[key][1]:
                    best[key] = (p["prompt_ids"] + p["chosen_ids"], p["chosen_reward"])
        stream = np.array([t for seq, _ in best.values() for t in seq + [EOT]], dtype=np.uint16)
        pft_cfg = SFTConfig(out=cfg.out, name="preferred_ft", init=path(cfg, "sft.pt"), block_size=cfg.block_size,
                            batch_size=cfg.sft_batch_size, max_steps=cfg.pft_steps, lr=cfg.pft_lr, min_lr=cfg.pft_lr,
                            warmup_steps=1, log_interval=max(1, cfg.pft_steps // 5), eval_interval=cfg.pft_steps,
                            eval_batches=2, save_interval=cfg.pft_steps, seed=cfg.seed, device=cfg.device, compile=False)
        pft_path = train_lm(pft_cfg, stream, stream)
        evaluator(common.load_model(pft_path).to(device), "Preferred-FT", None, cfg.pft_steps, log)
    return throughput([path(cfg, "preferred_ft_log.jsonl")], "tok_per_s", "preferred_ft_")


def read_rows(jsonl):
    """JSONL rows, the last one kept for each (method, beta, step): a resumed run repeats a few evaluations."""
    rows = {}
    with open(jsonl) as f:
        for line in f:
            row = json.loads(line)
            rows[(row["method"], row["beta"], row["step"])] = row
    return list(rows.values())


def stage_report(cfg, evaluator, device, summary):
    rows = read_rows(path(cfg, "baselines_eval.jsonl")) if os.path.exists(path(cfg, "baselines_eval.jsonl")) else []
    for beta in cfg.beta_list():
        log = os.path.join(path(cfg, f"dpo_beta{beta:g}"), "eval.jsonl")
        if os.path.exists(log):
            rows += sorted(read_rows(log), key=lambda r: r["step"])
    if not rows:
        raise UserError(f"no evaluation results in {cfg.out}; run the dpo and baselines stages first")
    common.atomic_write(path(cfg, "results.jsonl"), lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    plot_frontier(rows, path(cfg, "frontier.png"))
    final = {}
    for row in rows:  # the last step of each series
        key = (row["method"], row["beta"])
        if key not in final or row["step"] >= final[key]["step"]:
            final[key] = row
    table = ["| method | beta | step | KL | reward |", "|---|---|---|---|---|"]
    table += [f"| {r['method']} | {'' if r['beta'] is None else format(r['beta'], 'g')} | {r['step']} | "
              f"{r['kl']:.2f} | {r['reward']:.3f} |" for r in final.values()]
    table_text = "\n".join(table)
    print(table_text)
    # a handful of completions of the same test prefixes before (SFT) and after DPO (the first beta)
    enc = get_encoding()
    prompts = evaluator.prompts[:5]
    sections = [("SFT", common.load_model(path(cfg, "sft.pt")))]
    first_dpo = os.path.join(path(cfg, f"dpo_beta{cfg.beta_list()[0]:g}"), "dpo.pt")
    if os.path.exists(first_dpo):
        sections.append((f"DPO beta={cfg.beta_list()[0]:g}", common.load_model(first_dpo)))
    lines = []
    for name, model in sections:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        completions = generate(model.to(device).eval(), prompts, cfg.max_new_tokens, stop_at_eot=False, generator=generator)
        scores = evaluator.reward_model.score([p + c for p, c in zip(prompts, completions)])
        lines.append(name)  # [reward] prefix|completion, one line each
        lines += [f"[{s:.2f}] {enc.decode(p)}|{enc.decode(c)}".replace("\n", "\\n") for p, c, s in zip(prompts, completions, scores)]
    samples = "\n".join(lines)
    print(samples)
    common.atomic_write(path(cfg, "report.md"), lambda f: f.write(
        f"# Results\n\n{table_text}\n\nstage summary: {json.dumps(summary, indent=1)}\n\n"
        f"# Samples\n\n[reward] prefix|completion\n```\n{samples}\n```\n".encode()))
    return {}


def throughput(log_paths, key, prefix):
    """The median rate (and MFU, on GPU) over the trainers' progress lines: the median, because
    the lines of evaluation steps include the evaluation's time."""
    rows = []
    for log_path in filter(os.path.exists, log_paths):
        with open(log_path) as f:
            rows += [json.loads(line) for line in f]
    result = {}
    for name in (key, "mfu"):
        values = [row[name] for row in rows if name in row]
        if values:
            result[prefix + name] = float(np.median(values))
    return result


# ---------------------------------------------------------------------------- ordering the stages
def path(cfg, name):
    return os.path.join(cfg.out, name)


def mark_done(marker):
    if common.is_main():
        open(marker, "w").close()
    common.barrier()


def artifact_done(cfg, stage):
    """Whether a stage's artifact is complete (so the stage is skipped)."""
    if stage == "sft":
        return _finished_checkpoint(path(cfg, "sft.pt"), "sft", sft_config(cfg), SFT_RUN_FIELDS)
    if stage == "reward":
        return _finished_checkpoint(path(cfg, "reward.pt"), "reward", reward_config(cfg), REWARD_RUN_FIELDS)
    if stage == "pairs":
        return os.path.exists(path(cfg, "pairs.jsonl"))
    if stage == "dpo":
        return all(os.path.exists(os.path.join(path(cfg, f"dpo_beta{b:g}"), "done")) for b in cfg.beta_list())
    if stage == "baselines":
        return os.path.exists(path(cfg, "baselines_done"))
    return False  # the report is cheap: always redone


def _finished_checkpoint(ckpt_path, kind, stage_cfg, run_fields):
    """Whether ckpt_path holds the finished run of stage_cfg. A checkpoint of another run (for example
    one `python sft.py` left in the same folder with its own settings) is refused, not reused."""
    if not os.path.exists(ckpt_path):
        return False
    ckpt = common.load_checkpoint(ckpt_path, kind=kind)  # the same checks as the trainers' resume
    common.check_same_run(ckpt_path, ckpt, stage_cfg, run_fields)
    return ckpt["step"] >= stage_cfg.max_steps


def forget(cfg, stage):
    """--force: remove a stage's artifacts (only that stage's) so it runs again."""
    names = {"sft": ["sft.pt", "sft_log.jsonl"], "reward": ["reward.pt", "reward_log.jsonl"], "pairs": ["pairs.jsonl"],
             "dpo": [f"dpo_beta{b:g}" for b in cfg.beta_list()],
             "baselines": ["baselines_done", "baselines_eval.jsonl", "preferred_ft.pt", "preferred_ft_log.jsonl"]}
    for name in names.get(stage, []):
        p = path(cfg, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def check_run_folder(cfg):
    """An --out folder that holds another experiment's artifacts is refused instead of mixed."""
    saved = path(cfg, "config.json")
    keys = ("init", "n_layer", "n_head", "n_embd", "block_size", "sft_steps", "reward_steps", "n_prefixes",
            "completions_per_prefix", "max_new_tokens", "seed")
    if os.path.exists(saved):
        with open(saved) as f:
            old = json.load(f)
        differs = [k for k in keys if old.get(k) != getattr(cfg, k)]
        if differs:
            raise UserError(f"{cfg.out} holds a run with a different config ({', '.join(f'{k}: {old.get(k)} vs {getattr(cfg, k)}' for k in differs)}); "
                            f"pass another --out, or use the same settings to continue that run")
    common.save_json(saved, asdict(cfg))


def main():
    cfg = common.parse_config(TrainConfig, presets=PRESETS, default_preset="gpu" if torch.cuda.is_available() else "cpu",
                              description=__doc__.split("\n\n")[0])
    device = common.setup_device(cfg.device)
    check_run_folder(cfg)
    imdb = load_imdb(cfg.data, verify=cfg.data_verify)
    times_path = path(cfg, "stage_times.json")
    summary = json.load(open(times_path)) if os.path.exists(times_path) else {}
    evaluator = None
    for stage in STAGES:
        if cfg.stage not in ("all", stage):
            continue
        if cfg.force:
            forget(cfg, stage)
        elif artifact_done(cfg, stage):
            common.print0(f"=== {stage}: done already (artifact in {cfg.out}; --force redoes it)")
            continue
        common.print0(f"=== {stage}")
        t0 = time.time()
        if stage in ("dpo", "baselines", "report") and evaluator is None:
            evaluator = Evaluator(cfg, imdb, device)
        result = {}
        if stage == "sft":
            result = stage_sft(cfg, imdb)
        elif stage == "reward":
            result = stage_reward(cfg, imdb)
        elif stage == "pairs":
            result = stage_pairs(cfg, imdb, device)
        elif stage == "dpo":
            result = stage_dpo(cfg, evaluator)
        elif stage == "baselines":
            result = stage_baselines(cfg, evaluator, device)
            mark_done(path(cfg, "baselines_done"))
        elif common.is_main():  # the report: one process draws and writes it
            result = stage_report(cfg, evaluator, device, summary)
        common.barrier()
        summary[stage] = {"seconds": round(time.time() - t0, 1), **result, "device": device,
                          "hardware": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU x{os.cpu_count()}"}
        common.save_json(times_path, summary)
        rates = "".join(f", {k} {v:.3g}" for k, v in result.items() if k.endswith(("_per_s", "mfu")))
        common.print0(f"=== {stage}: {summary[stage]['seconds']:.0f}s{rates}")
    common.print0("stage times: " + ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in summary.items()))


if __name__ == "__main__":
    common.run_main(main)
