"""
Throughput of the project's hot loops on a randomly initialised GPT fed random tokens: an SFT
step, a DPO step with a live reference model and with precomputed reference log-probs,
static-cache sampling at two batch sizes, one evaluation (a frontier point), and a PPO step (rollout
and update). Each runs the trainers' own functions (losses, optimizers, autocast), so the
numbers predict the real runs. FLOPs are counted explicitly; MFU where the GPU's peak is known.

    python bench.py                    # preset by device: cpu or gpu
    python bench.py --preset smoke     # seconds, to check that it runs
    python bench.py --n-layer 24 --n-head 16 --n-embd 1024 --out-json out/bench.json
"""
import copy
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

import dpo
import evaluate
import ppo
import sample
import sft
from checkpoint import save_json
from cli import UserError, check, parse_config, run_main
from data import EOT
from device import hardware_name, peak_flops, pick_device
from model import GPT, GPTConfig
from optim import adamw, seed_everything

PROMPT_LENGTHS = (2, 8)  # prompts of DPO pairs and of sampling: 2 to 8 tokens, like IMDb review openings


@dataclass
class BenchConfig:
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_embd: int = field(default=128, metadata={"help": "model width"})
    block_size: int = field(default=128, metadata={"help": "context; also the SFT sequence length"})
    output_vocab: int = field(default=8192, metadata={"help": "tokens the LM head scores, as train.py's --output-vocab (0: all 50,257)"})
    batch_size: int = field(default=16, metadata={"help": "SFT sequences per step"})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO pairs per step"})
    response_len: int = field(default=48, metadata={"help": "tokens per DPO response, before its end-of-text"})
    sample_batch_size: int = field(default=16, metadata={"help": "prompts sampled together (and 4x that in a second row)"})
    eval_prompts: int = field(default=96, metadata={"help": "prompts of one evaluation (the cpu preset's --eval-prefixes)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens sampled per prompt"})
    warmup: int = field(default=1, metadata={"help": "untimed iterations before each benchmark"})
    repeats: int = field(default=3, metadata={"help": "timed iterations of each benchmark; the median is reported"})
    compile: bool = field(default=True, metadata={"help": "torch.compile the SFT model on CUDA, as sft.py does"})
    seed: int = field(default=0, metadata={"help": "random seed (weights and tokens)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    out_json: str = field(default=None, metadata={"help": "also write the table to this JSON file"})
    only: str = field(default="", metadata={"help": "comma-separated benchmarks to run, by the start of their names (sample,ppo); empty = all"})

    def validate(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dpo_batch_size", "response_len",
                     "sample_batch_size", "eval_prompts", "max_new_tokens", "repeats"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        check(self.output_vocab == 0 or 2 <= self.output_vocab <= EOT + 1,
              f"--output-vocab must be 0 (every token) or in [2, {EOT + 1}], got {self.output_vocab}")
        check(self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head}")
        longest = PROMPT_LENGTHS[1]
        check(longest + self.response_len + 1 <= self.block_size,
              f"a prompt of {longest} tokens + --response-len {self.response_len} + end-of-text exceeds --block-size {self.block_size}")
        check(longest + self.max_new_tokens <= self.block_size,
              f"a prompt of {longest} tokens + --max-new-tokens {self.max_new_tokens} exceeds --block-size {self.block_size}")


PRESETS = {
    "smoke": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, output_vocab=512, batch_size=4, dpo_batch_size=2, response_len=16,
                  sample_batch_size=4, eval_prompts=8, max_new_tokens=16),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, dpo_batch_size=8, sample_batch_size=16),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, output_vocab=0, batch_size=64, dpo_batch_size=64, sample_batch_size=256,
                eval_prompts=512, warmup=3, repeats=10),  # iterations are cheap on a GPU; the first also compiles
}


# ---------------------------------------------------------------------------- inputs and timing
def new_model(cfg, device):
    """A fresh GPT-2-vocabulary model, the same random weights at every call; with --output-vocab K, its
    head scores ids 0..K-2 and end-of-text (which K tokens changes no timing)."""
    seed_everything(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          output_vocab=cfg.output_vocab))
    if cfg.output_vocab:
        model.output_ids.copy_(torch.cat([torch.arange(cfg.output_vocab - 1), torch.tensor([EOT])]))
    return model.to(device)


def scored_below(cfg):
    """new_model's head scores every id below this (and end-of-text): the tokens its losses are taken on."""
    return cfg.output_vocab - 1 if cfg.output_vocab else EOT


def random_tokens(n, generator, high=EOT):
    return torch.randint(0, high, (n,), generator=generator).tolist()  # any token below high (end-of-text)


def random_prompts(n, generator):
    lengths = torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (n,), generator=generator).tolist()
    return [random_tokens(k, generator) for k in lengths]


def median_seconds(step, cfg, device):
    """Median wall time of step() over cfg.repeats calls, after cfg.warmup untimed ones (which also
    absorb torch.compile). The GPU is synchronised before each clock reading."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(cfg.warmup):
        step()
    times = []
    for _ in range(cfg.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------- the benchmarks
# Each returns (config, throughput, unit, FLOPs per unit, the formula of that count).
# N = model.multiplied_params(): every weight but the position embedding (the tied token embedding is the
# output head's matmul; with --output-vocab, only the rows the head scores); L layers, C width, T sequence length.

def bench_sft(cfg, device):
    """One AdamW step on batch_size x block_size tokens: sft.sft_step, as sft.train_lm takes it."""
    model = new_model(cfg, device).train()
    forward = torch.compile(model) if cfg.compile and device.startswith("cuda") else model
    trainer = sft.SFTConfig()  # the trainer's optimizer settings
    optimizer = adamw(model, trainer.lr, trainer.weight_decay, (0.9, 0.95), device)
    windows = torch.randint(0, scored_below(cfg), (cfg.batch_size, cfg.block_size + 1), device=device)  # (B, T + 1)

    def step():
        sft.sft_step(model, optimizer, [windows], trainer.lr, trainer.grad_clip, step=0, forward=forward)

    seconds = median_seconds(step, cfg, device)
    T = cfg.block_size
    # forward + backward per token: 6N for the weights, 12LCT for attention scores and their use
    return f"{cfg.batch_size} x {T}", cfg.batch_size * T / seconds, "tokens/s", model.flops_per_token(T), f"6N + 12LCT, T={T}"


def bench_dpo(cfg, device, live_reference):
    """One RMSprop step on dpo_batch_size pairs: dpo.dpo_step, as dpo.train_dpo takes it."""
    policy = new_model(cfg, device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    trainer = dpo.DPOConfig()  # the trainer's defaults: the paper's RMSprop, lr and beta
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=trainer.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    pairs = [dpo.PreferencePair(prompt, random_tokens(cfg.response_len, generator, scored_below(cfg)),
                                random_tokens(cfg.response_len, generator, scored_below(cfg)))
             for prompt in random_prompts(cfg.dpo_batch_size, generator)]
    precomputed = None
    if not live_reference:
        precomputed = dpo.precompute_reference_logps(reference, pairs, len(pairs), cfg.block_size, device)  # (B, 2)
        reference = None  # as in train_dpo: the reference model is not needed any more

    def step():
        dpo.dpo_step(policy, optimizer, [(pairs, precomputed)], reference, trainer, cfg.block_size, trainer.lr, step=0)

    seconds = median_seconds(step, cfg, device)
    T = dpo.collate(pairs, cfg.block_size)[0].size(1)  # the padded length of both rows of a pair
    R, head = cfg.response_len + 1, policy.config.head_tokens * policy.config.n_embd  # response + EOT; the LM head's weights
    # per pair: policy forward + backward over 2 rows of T tokens, 2T (6N + 12LCT), less the LM head at
    # the T - R positions that predict no response token (logprobs.response_token_logps skips them), 6VC each;
    # a live reference adds their forward, a third of that
    flops = 2 * (T * policy.flops_per_token(T) - (T - R) * 6 * head) * (4 / 3 if live_reference else 1)
    formula = f"2[T(6N + 12LCT) - (T - R)6VC]{' x 4/3' if live_reference else ''}, T={T}, R={R}"
    return f"{cfg.dpo_batch_size} x {T}", cfg.dpo_batch_size / seconds, "pairs/s", flops, formula


def bench_sample(cfg, device, batch):
    """sample.generate of max_new_tokens per prompt for `batch` prompts, never stopping early: the
    static-cache sampler (a CUDA graph per decode step on a GPU), its graph captured in the warm-up."""
    model = new_model(cfg, device).eval()
    prompts = random_prompts(batch, torch.Generator().manual_seed(cfg.seed))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def step():
        sample.generate(model, prompts, cfg.max_new_tokens, stop_at_eot=False, generator=generator)

    seconds = median_seconds(step, cfg, device)
    flops, formula = sampling_flops(model, prompts, cfg.max_new_tokens)
    return f"{batch} x {cfg.max_new_tokens}", batch * cfg.max_new_tokens / seconds, "tokens/s", flops, formula


def sampling_flops(model, prompts, max_new_tokens):
    """Forward only, per new token: 2N for the weights + 4LC per cached position attended (QK^T and AV).
    New token n = 0, 1, ... is predicted from P + n positions, P the left-padded prompt width, so the
    mean context is P + (n_new - 1) / 2; the prefill's other prompt positions are left out."""
    c = model.config
    context = max(len(p) for p in prompts) + (max_new_tokens - 1) / 2
    return 2 * model.multiplied_params() + 4 * c.n_layer * c.n_embd * context, f"2N + 4LC x context, context={context:g}"


class RandomScores:
    """A stand-in for the reward and the judge: their scoring is not what this benchmark times."""

    def score(self, texts):
        return torch.rand(len(texts), generator=torch.Generator().manual_seed(len(texts))).numpy()


def bench_evaluation(cfg, device):
    """One frontier point, evaluate.evaluate_policy as the Evaluator calls it: eval_prompts completions
    sampled from the policy, then the sequence KL (the policy's and reference's full logits) and the
    reference's log-probs, in evaluate.KL_ROWS rows per pass. The classifiers are stand-ins."""
    policy = new_model(cfg, device).eval()
    reference = copy.deepcopy(policy)
    prompts = random_prompts(cfg.eval_prompts, torch.Generator().manual_seed(cfg.seed))

    def step():
        evaluate.evaluate_policy(policy, reference, RandomScores(), RandomScores(), prompts, cfg.max_new_tokens,
                                 cfg.sample_batch_size * 4, seed=cfg.seed)

    seconds = median_seconds(step, cfg, device)
    per_token, _ = sampling_flops(policy, prompts, cfg.max_new_tokens)
    T, N = max(len(p) for p in prompts) + cfg.max_new_tokens, policy.multiplied_params()
    # per prompt: sampling L tokens, then the policy's and the reference's forward over T tokens (2 x 2N each)
    flops = cfg.max_new_tokens * per_token + T * 4 * N
    return (f"{cfg.eval_prompts} x {cfg.max_new_tokens}", cfg.eval_prompts / seconds, "prompts/s", flops,
            f"L(2N + 4LC x context) + T(4N), L={cfg.max_new_tokens}, T={T}")


def bench_ppo(cfg, device):
    """One PPO step on sample_batch_size prompts: ppo.rollout (sampling, the policy's and reference's
    log-probs, the critic's values, GAE) then ppo.update (2 epochs of 4 minibatches), as ppo.train_ppo
    takes them. The reward is a stand-in (random scores): scoring is not PPO's cost."""
    policy = new_model(cfg, device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = ppo.Critic(policy.config)
    critic.gpt.load_state_dict(reference.state_dict())
    critic.to(device)
    trainer = ppo.PPOConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.sample_batch_size,
                            minibatch_size=max(1, cfg.sample_batch_size // 4))  # the trainer's other defaults
    optimizers = (adamw(policy, trainer.lr, 0.0, (0.9, 0.95), device), adamw(critic, trainer.critic_lr, 0.0, (0.9, 0.95), device))
    prompts = random_prompts(cfg.sample_batch_size, torch.Generator().manual_seed(cfg.seed))
    scores = torch.rand(len(prompts), generator=torch.Generator().manual_seed(cfg.seed)).double().numpy()

    def step():
        policy.eval()
        batch, _ = ppo.rollout(policy, reference, critic, prompts, lambda texts: scores, (0.0, 1.0), trainer.init_kl_coef,
                               trainer, step=0)
        policy.train()
        ppo.update(policy, critic, optimizers, batch, trainer, trainer.lr, trainer.critic_lr, step=0)

    seconds = median_seconds(step, cfg, device)
    L, T, N = cfg.max_new_tokens, max(len(p) for p in prompts) + cfg.max_new_tokens, policy.multiplied_params()
    # per rollout: sampling L tokens (2N each), the policy's and reference's forward over T tokens
    # (2 x 2N each), and per epoch the policy's forward + backward (6N per token). The critic (the
    # trunk alone) and attention are left out, so the count is a little low.
    flops = L * 2 * N + T * 4 * N + trainer.epochs * T * 6 * N
    return (f"{cfg.sample_batch_size} x {cfg.max_new_tokens}", cfg.sample_batch_size / seconds, "samples/s", flops,
            f"L(2N) + T(4N) + epochs x T(6N), L={L}, T={T}, epochs={trainer.epochs}")


# ---------------------------------------------------------------------------- the report
def check_out_json(path):
    """--out-json must be a file whose folder exists or can be made: checked before the benchmarks
    run, not after."""
    if os.path.isdir(path):
        raise UserError(f"--out-json {path} is a folder; pass a file path such as {os.path.join(path, 'bench.json')}")
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out-json {path}: cannot create the folder {folder} ({e.strerror}); pass another path") from None


def print_table(rows):
    header = ("benchmark", "config (batch x length)", "throughput", "FLOPs/unit", "MFU")
    lines = [header] + [(r["benchmark"], r["config"], f"{r['throughput']:,.1f} {r['unit']}", f"{r['flops_per_unit']:.4g}",
                         "-" if r["mfu"] is None else f"{r['mfu']:.1%}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, presets=PRESETS, default_preset="gpu" if torch.cuda.is_available() else "cpu",
                              description="Throughput and MFU of SFT, DPO, sampling and PPO on a random model.")
    if cfg.out_json:
        check_out_json(cfg.out_json)
    device = pick_device(cfg.device)
    peak = peak_flops(device)
    benchmarks = {
        "sft": lambda: bench_sft(cfg, device),
        "dpo, live reference": lambda: bench_dpo(cfg, device, live_reference=True),
        "dpo, precomputed reference": lambda: bench_dpo(cfg, device, live_reference=False),
        "sample, static cache": lambda: bench_sample(cfg, device, cfg.sample_batch_size),
        "sample, static cache, 4x batch": lambda: bench_sample(cfg, device, 4 * cfg.sample_batch_size),
        "evaluation (one frontier point)": lambda: bench_evaluation(cfg, device),
        "ppo step (rollout + update)": lambda: bench_ppo(cfg, device),
    }
    chosen = [name for name in benchmarks if not cfg.only or any(name.startswith(w.strip()) for w in cfg.only.split(","))]
    if not chosen:
        raise UserError(f"--only {cfg.only!r} names no benchmark; the benchmarks are: {', '.join(benchmarks)}")
    print(f"bench: N = {new_model(cfg, 'cpu').multiplied_params():,} parameters multiplied per token, L={cfg.n_layer}, C={cfg.n_embd}, "
          f"device {device}, median of {cfg.repeats} runs after {cfg.warmup} warm-up")
    rows = []
    for name in chosen:
        run = benchmarks[name]
        config, throughput, unit, flops, formula = run()
        mfu = throughput * flops / peak if peak else None
        rows.append(dict(benchmark=name, config=config, throughput=throughput, unit=unit, flops_per_unit=flops,
                         flops_formula=formula, mfu=mfu))
        print(f"{name}: {throughput:,.1f} {unit} | FLOPs per unit: {formula} = {flops:.4g}")
    print()
    print_table(rows)
    print(f"hardware: {hardware_name(device)} | torch {torch.__version__}")
    if cfg.out_json:
        save_json(cfg.out_json, {"hardware": hardware_name(device), "torch": torch.__version__,
                                        "config": dataclasses.asdict(cfg), "rows": rows})


if __name__ == "__main__":
    run_main(main)
