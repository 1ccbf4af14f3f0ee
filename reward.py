"""
The IMDb experiment's two sentiment classifiers, P(positive | tokens). Both are trained on the 25k
labelled train reviews (opening crops of random length, because they score short texts), tested on
the test reviews at 32 and 64 tokens and full length, then frozen. Neither shares weights with the
policy.

  ngram  logistic regression on hashed 1-4-grams of lower-cased tokens, started from the naive
         Bayes log-count ratios (NBSVM, Wang & Manning 2012). The ground-truth reward
         r(x, y) = P(positive | x + y) of train.py: the more accurate on short texts, and it
         trains in under a minute on 2 CPU cores.
  gpt    the GPT trunk, initialised from the SFT model, with a linear head on mean-pooled
         features. train.py's second judge: a classifier of another kind, trained on the same
         labels, that scores the same evaluation samples and never trains or selects anything.
         A gain that only the reward sees is the reward being gamed.

    python reward.py                            # ngram -> out/reward.pt
    python reward.py --kind gpt --name judge    # after python sft.py: out/sft.pt -> out/judge.pt
"""
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (append_jsonl, check_same_run, check_size, load_checkpoint, load_model, load_state, model_config, resume,
                        run_identity, save_checkpoint, training_checkpoint)
from cli import UserError, check, parse_config, run_main
from data import get_encoding, load_imdb
from device import autocast, check_divisible, data_parallel, gather, local_slice, print0, setup_device
from model import GPT, left_pad
from optim import adamw, apply_gradients, batch_indices, seed_everything, warmup_cosine
from progress import Progress
from roberta import is_roberta_folder, load_roberta

KINDS = ("ngram", "gpt")
VOCAB = 50257  # GPT-2's token ids
# the settings that define a classifier: a checkpoint continues (or, finished, stands for) only its own run
RESUME_FIELDS = {"ngram": ("kind", "max_len", "min_len", "batch_size", "steps", "lr", "order", "bits", "nb_scale", "seed"),
                 "gpt": ("kind", "sft", "max_len", "min_len", "batch_size", "steps", "lr", "warmup_steps", "seed")}
DEFAULT_LR = {"ngram": 5e-3, "gpt": 3e-4}


# ---------------------------------------------------------------------------- the n-gram classifier
@dataclass
class NgramConfig:
    order: int = 4  # n-grams of 1..order tokens
    bits: int = 24  # 2**bits hashed weights

    def __post_init__(self):
        if not (isinstance(self.order, int) and 1 <= self.order <= 8 and isinstance(self.bits, int) and 8 <= self.bits <= 28):
            raise ValueError(f"order must be in 1..8 and bits in 8..28, got order={self.order!r} bits={self.bits!r}")


def word_ids():
    """Each GPT-2 token id -> the id of its lower-cased text without spaces, so " Great" and "great"
    are one word. Built from tiktoken once; a checkpoint stores it, so scoring needs no tokenizer."""
    enc, ids = get_encoding(), {}
    words = [ids.setdefault(enc.decode_single_token_bytes(t).decode("utf-8", "replace").strip().lower(), len(ids))
             for t in range(VOCAB)]
    return torch.tensor(words, dtype=torch.long)


class NgramClassifier(nn.Module):
    """logit(x) = bias + sum over the n-grams g of x of w[hash(g)] / sqrt(number of n-grams of x):
    logistic regression on n-gram counts, scaled so that short and long texts score alike."""

    def __init__(self, config, words=None):
        super().__init__()
        self.config = config
        self.register_buffer("words", words if words is not None else torch.zeros(VOCAB, dtype=torch.long))
        self.table = nn.EmbeddingBag(2 ** config.bits, 1, mode="sum", sparse=True)  # one weight per hashed n-gram
        nn.init.zeros_(self.table.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def ngrams(self, tokens, word_table=None):
        """The hashed bucket of every n-gram (n = 1..order) of a token list, as int64 numpy.
        word_table: self.words as numpy, when the caller has it at hand (the model may be on a GPU)."""
        word_table = self.words.cpu().numpy() if word_table is None else word_table
        words = word_table[np.asarray(tokens, dtype=np.int64)].astype(np.uint64)
        grams, gram = [], words
        for n in range(1, self.config.order + 1):
            if n > 1:  # extend each (n-1)-gram by the next word: a polynomial hash, wrapping mod 2**64
                gram = gram[:-1] * np.uint64(VOCAB) + words[n - 1:]
            grams.append((gram + np.uint64(n)) * np.uint64(0x9E3779B97F4A7C15))  # Fibonacci hashing: keep the top bits
        return (np.concatenate(grams) >> np.uint64(64 - self.config.bits)).astype(np.int64)

    def forward(self, sequences):
        """Logit of P(positive) (B,) for a list of token lists."""
        word_table = self.words.cpu().numpy()  # the hashing runs on the CPU, wherever the weights are
        grams = [self.ngrams(s, word_table) for s in sequences]
        lengths = torch.tensor([len(g) for g in grams], dtype=torch.long)
        flat = torch.from_numpy(np.concatenate([np.zeros(0, np.int64)] + grams))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[:-1]]).cumsum(0)  # where each text's n-grams start
        scale = (1 / lengths.clamp(min=1).float().sqrt()).repeat_interleave(lengths)
        device = self.bias.device
        return self.table(flat.to(device), offsets.to(device), per_sample_weights=scale.to(device)).squeeze(-1) + self.bias

    @torch.no_grad()
    def score(self, sequences, batch_size=1024):
        """P(positive | tokens) for each token list, as a float64 numpy array in [0, 1]."""
        out = [torch.sigmoid(self(sequences[i:i + batch_size])).cpu() for i in range(0, len(sequences), batch_size)]
        return torch.cat([torch.zeros(0)] + out).double().numpy()

    @torch.no_grad()
    def logits(self, sequences, batch_size=1024):
        """The logit log(P / (1 - P)) of P(positive | tokens) for each token list, as a float64 numpy array."""
        out = [self(sequences[i:i + batch_size]).cpu() for i in range(0, len(sequences), batch_size)]
        return torch.cat([torch.zeros(0)] + out).double().numpy()


def naive_bayes_ratios(model, split):
    """log P(g | positive) - log P(g | negative) per hashed n-gram, counting each n-gram once per
    review, with add-one smoothing: the naive Bayes classifier's weights."""
    counts = np.zeros((2, 2 ** model.config.bits), dtype=np.int32)
    word_table = model.words.cpu().numpy()
    for i in range(len(split)):
        counts[split.labels[i], np.unique(model.ngrams(split.review(i), word_table))] += 1
    p = (counts + 1) / (counts + 1).sum(1, keepdims=True)
    return np.log(p[1]) - np.log(p[0])


# ---------------------------------------------------------------------------- the GPT-trunk classifier
class GPTClassifier(nn.Module):
    """logit(x) = head(mean over the real tokens of x of the GPT trunk's last hidden states)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)  # only the trunk is used; the tied LM head adds no parameters
        self.head = nn.Linear(config.n_embd, 1)

    def forward(self, idx, attention_mask):
        """Logit of P(positive) per row (B,), from left-padded ids and their attention mask (B, T)."""
        features = self.gpt.hidden_states(idx, attention_mask)  # (B, T, C)
        weights = attention_mask.unsqueeze(-1).to(features.dtype)  # (B, T, 1): average real tokens only
        pooled = (features * weights).sum(1) / weights.sum(1)  # (B, C)
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def logits(self, sequences, batch_size=256):
        """The logit of each token list (cut to the context), as a float64 numpy array. For the
        Bradley-Terry reward model of RLHF (bradley_terry.py) it is the reward r(x, y) itself."""
        device = next(self.parameters()).device
        limit = self.gpt.config.block_size
        out = [torch.zeros(0)]
        for i in range(0, len(sequences), batch_size):
            ids, mask = left_pad([s[:limit] for s in sequences[i:i + batch_size]], device=device)
            with autocast(device.type):
                out.append(self(ids, mask).float().cpu())
        return torch.cat(out).double().numpy()

    def score(self, sequences, batch_size=256):
        """P(positive | tokens) for each token list (cut to the context), as a float64 numpy array in [0, 1]."""
        return 1 / (1 + np.exp(-self.logits(sequences, batch_size)))


def load_classifier(path):
    """A classifier, frozen, on the CPU: a checkpoint of any of ours (n-gram, GPT trunk, Bradley-Terry
    reward model), or a RoBERTa sentiment classifier's save_pretrained folder (roberta.py, the paper's
    ground truth). Each scores token lists: score() -> P(positive), logits()."""
    if is_roberta_folder(path):
        return load_roberta(path)
    return classifier_from(load_checkpoint(path, kind="reward"), path)


def reward_function(path, device, logit=False):
    """r(x, y) of token lists, as float64 numpy, from a classifier (load_classifier): P(positive) for a
    sentiment classifier (the ground truth), the logit r itself for a Bradley-Terry reward model.
    logit: the logit of either kind, the scale on which sigma(r(y) - r(y')) is a Bradley-Terry
    preference (SPPO's win rates); for a sentiment classifier, log P(positive) / P(negative)."""
    if is_roberta_folder(path):
        model, bradley_terry = load_roberta(path), False
    else:
        ckpt = load_checkpoint(path, kind="reward")
        model, bradley_terry = classifier_from(ckpt, path), ckpt.get("classifier") == "bradley_terry"
    model = model.to(device)
    return model.logits if logit or bradley_terry else model.score


def classifier_from(ckpt, path):
    if ckpt.get("classifier") == "ngram":
        try:
            config = NgramConfig(**ckpt["model_config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} holds an unusable model_config ({e}); it is damaged or not from this project") from None
        check_size(path, 2 ** config.bits, ckpt["model"])  # the hashed weight table
        model = NgramClassifier(config)
    else:  # gpt, bradley_terry: the GPT trunk with a scalar head
        model = GPTClassifier(model_config(ckpt, path))
    load_state(model, ckpt["model"], path)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- training
@dataclass
class RewardConfig:
    kind: str = field(default="ngram", metadata={"help": "ngram (the reward of train.py) | gpt (its second judge)"})
    name: str = field(default="reward", metadata={"help": "OUT/NAME.pt, OUT/NAME_log.jsonl"})
    sft: str = field(default="out/sft.pt", metadata={"help": "gpt: the SFT checkpoint whose trunk starts the classifier"})
    out: str = field(default="out", metadata={"help": "run folder (OUT/NAME.pt: out/reward.pt, out/judge.pt, where train.py writes them)"})
    data: str = field(default=None, metadata={"help": "IMDb archive or aclImdb/ folder (else $IMDB_ARCHIVE, data/, download)"})
    data_verify: bool = field(default=True, metadata={"help": "require the full 25k/25k/50k archive"})
    max_len: int = field(default=0, metadata={"help": "longest training crop in tokens (0 = ngram 256, gpt the SFT model's context)"})
    min_len: int = field(default=8, metadata={"help": "shortest training crop (rewards score short texts)"})
    batch_size: int = field(default=64, metadata={"help": "reviews per step"})
    steps: int = field(default=1600, metadata={"help": "optimizer steps"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0 = ngram 5e-3, gpt 3e-4)"})
    order: int = field(default=4, metadata={"help": "ngram: n-grams of 1..order tokens"})
    bits: int = field(default=24, metadata={"help": "ngram: 2**bits hashed n-gram weights"})
    nb_scale: float = field(default=0.5, metadata={"help": "ngram: the weights start at nb_scale x the naive Bayes log-count ratios"})
    warmup_steps: int = field(default=50, metadata={"help": "gpt: linear warm-up steps, then cosine to lr/10"})
    weight_decay: float = field(default=0.01, metadata={"help": "gpt: AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "gpt: clip the gradient norm (0 = off)"})
    test_reviews: int = field(default=0, metadata={"help": "test reviews scored for accuracy (0 = all 25k)"})
    log_interval: int = field(default=100, metadata={"help": "steps between progress lines"})
    save_interval: int = field(default=200, metadata={"help": "gpt: steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (data order and crops)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (ngram: always the CPU)"})

    def validate(self):
        check(self.kind in KINDS, f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("min_len", "batch_size", "steps", "log_interval", "save_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check(self.max_len == 0 or self.min_len <= self.max_len, f"--min-len {self.min_len} must not exceed --max-len {self.max_len}")
        check(self.max_len >= 0 and self.lr >= 0 and self.test_reviews >= 0, "--max-len, --lr and --test-reviews must be >= 0")
        check(self.nb_scale >= 0, f"--nb-scale must be >= 0, got {self.nb_scale}")
        NgramConfig(self.order, self.bits)  # its own checks


def crops(split, indices, min_len, max_len, seed):
    """The first L tokens of each review, L log-uniform in [min_len, max_len] (the whole review if shorter)."""
    lengths = np.exp(np.random.default_rng(seed).uniform(np.log(min_len), np.log(max_len + 1), len(indices))).astype(int)
    return [split.review(i)[:n].tolist() for i, n in zip(indices, lengths)]


ACCURACY_LENGTHS = {"acc_32": 32, "acc_64": 64, "acc_full": None}  # None: the whole review (gpt: up to its context)


def accuracies(model, split, n):
    """Fraction of test reviews classified right from their first 32 and 64 tokens and from the
    whole review: n reviews drawn at random (seed 0), or all when n is 0."""
    indices = np.random.default_rng(0).permutation(len(split))[:n] if n else np.arange(len(split))
    truth = split.labels[indices] == 1
    result = {}
    for name, length in ACCURACY_LENGTHS.items():
        sequences = [split.review(i)[:length].tolist() for i in indices]
        scores = np.array(gather(model.score(local_slice(sequences)).tolist()))  # each rank scores a share
        result[name] = float(((scores > 0.5) == truth).mean())
    return result


def train_ngram(cfg, imdb):
    """The n-gram classifier: naive Bayes weights, then logistic regression by Adam on opening crops."""
    train = imdb["train"]
    max_len = cfg.max_len or 256
    seed_everything(cfg.seed)
    model = NgramClassifier(NgramConfig(cfg.order, cfg.bits), word_ids())
    t0 = time.time()
    with torch.no_grad():
        model.table.weight[:, 0] = torch.from_numpy(cfg.nb_scale * naive_bayes_ratios(model, train)).float()
    print0(f"{cfg.name}: naive Bayes counts of {len(train)} reviews in {time.time() - t0:.1f}s")
    lr = cfg.lr or DEFAULT_LR["ngram"]
    table_optimizer = torch.optim.SparseAdam([model.table.weight], lr=lr)  # touches only the n-grams in the batch
    bias_optimizer = torch.optim.Adam([model.bias], lr=lr)
    progress = Progress(cfg.name, cfg.steps, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="reviews")
    for step in range(cfg.steps):
        indices = batch_indices(step, cfg.batch_size, len(train), cfg.seed)
        labels = torch.tensor(train.labels[indices], dtype=torch.float32)
        logits = model(crops(train, indices, cfg.min_len, max_len, [cfg.seed, step]))
        loss = F.binary_cross_entropy_with_logits(logits, labels)  # -log P(label | review)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: lower --lr")
        table_optimizer.zero_grad(), bias_optimizer.zero_grad()
        loss.backward()
        table_optimizer.step(), bias_optimizer.step()
        progress.add(cfg.batch_size)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.steps:
            progress.line(step + 1, {"loss": loss.item(), "acc": ((logits > 0).float() == labels).float().mean().item()})
    return model


def train_gpt(cfg, imdb, ckpt_path):
    """The GPT-trunk classifier, fine-tuned from the SFT model; resumes from its checkpoint."""
    device = setup_device(cfg.device)
    check_divisible(cfg.batch_size, "--batch-size")
    sft = load_model(cfg.sft, kinds=("sft",))
    max_len, peak_lr = cfg.max_len or sft.config.block_size, cfg.lr or DEFAULT_LR["gpt"]
    if max_len > sft.config.block_size:
        raise UserError(f"--max-len {max_len} exceeds the SFT model's context of {sft.config.block_size}")
    seed_everything(cfg.seed)
    model = GPTClassifier(sft.config)
    model.gpt.load_state_dict(sft.state_dict())
    model.to(device).train()
    optimizer = adamw(model, peak_lr, cfg.weight_decay, (0.9, 0.99), device)
    train = imdb["train"]
    step, _ = resume(ckpt_path, "reward", cfg, RESUME_FIELDS["gpt"], model, optimizer)
    train_forward = data_parallel(model, device)  # under torchrun; the model itself otherwise
    progress = Progress(cfg.name, cfg.steps, os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), unit="reviews", start_step=step)
    while step < cfg.steps:
        indices = batch_indices(step, cfg.batch_size, len(train), cfg.seed)
        texts = local_slice(crops(train, indices, cfg.min_len, max_len, [cfg.seed, step]))
        ids, mask = left_pad(texts, device=device)  # this rank's share of the global batch
        labels = torch.tensor(train.labels[local_slice(indices)], dtype=torch.float32, device=device)
        lr = warmup_cosine(step, cfg.warmup_steps, cfg.steps, peak_lr, peak_lr / 10)
        with autocast(device):
            logits = train_forward(ids, mask)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)  # -log P(label | review)
        loss.backward()
        batch_acc = ((logits > 0).float() == labels).float().mean()
        metrics = apply_gradients(model, optimizer, {"loss": loss.item(), "acc": batch_acc.item()}, lr, cfg.grad_clip, step)
        step += 1
        progress.add(cfg.batch_size)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            progress.line(step, {**metrics, "lr": lr})
        if step % cfg.save_interval == 0 and step < cfg.steps:
            save_checkpoint(ckpt_path, training_checkpoint("reward", model, optimizer, cfg, RESUME_FIELDS["gpt"], step,
                                                           classifier="gpt"))
    return model.eval()


def train_reward(cfg, imdb):
    """Train a classifier of cfg.kind, measure its test accuracy and save it, frozen; returns
    (checkpoint path, accuracies). A finished checkpoint is returned as it is."""
    if cfg.test_reviews > len(imdb["test"]):
        raise UserError(f"--test-reviews {cfg.test_reviews} exceeds the {len(imdb['test'])} test reviews in the data")
    ckpt_path = os.path.join(cfg.out, f"{cfg.name}.pt")
    identity = run_identity(cfg, RESUME_FIELDS[cfg.kind])
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, kind="reward")
        check_same_run(ckpt_path, ckpt.get("run", {}), identity)
        if ckpt.get("accuracy") is not None:
            return ckpt_path, ckpt["accuracy"]
    model = train_ngram(cfg, imdb) if cfg.kind == "ngram" else train_gpt(cfg, imdb, ckpt_path)
    accuracy = accuracies(model, imdb["test"], cfg.test_reviews)
    n = cfg.test_reviews or len(imdb["test"])
    full = "full length" if cfg.kind == "ngram" else f"the first {model.gpt.config.block_size} tokens (its context)"
    print0(f"{cfg.name} ({cfg.kind}) test accuracy on {n} test reviews: {accuracy['acc_32']:.3f} at 32 tokens, "
           f"{accuracy['acc_64']:.3f} at 64, {accuracy['acc_full']:.3f} at {full}")
    append_jsonl(os.path.join(cfg.out, f"{cfg.name}_log.jsonl"), {"step": cfg.steps, **accuracy})
    # the frozen classifier: no optimizer state (the n-gram table's would triple its size)
    save_checkpoint(ckpt_path, {"kind": "reward", "classifier": cfg.kind, "model": model.state_dict(),
                                "model_config": asdict(model.config), "config": asdict(cfg), "run": identity,
                                "accuracy": accuracy})
    return ckpt_path, accuracy


def main():
    cfg = parse_config(RewardConfig, description="Train an IMDb sentiment classifier: the ground-truth reward or the second judge.")
    imdb = load_imdb(cfg.data, verify=cfg.data_verify)
    path, accuracy = train_reward(cfg, imdb)
    print0(f"checkpoint: {path} (test accuracy {accuracy['acc_64']:.3f} at 64 tokens)")


if __name__ == "__main__":
    run_main(main)
