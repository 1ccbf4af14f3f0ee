import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_shared_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_cache)


import io  # noqa: E402
import math  # noqa: E402
import tarfile  # noqa: E402

import pytest  # noqa: E402

POSITIVE = "wonderful superb moving brilliant delightful touching great charming".split()
NEGATIVE = "awful boring dull terrible weak clumsy tedious bad".split()
NEUTRAL = "the film story actor scene plot movie director camera music this was and with".split()


def write_tiny_imdb(path, n_train=40, n_test=20, n_unsup=20, words=60):
    """A small aclImdb_v1.tar.gz: each labelled review mixes neutral words with words of its sentiment."""
    import random
    rng = random.Random(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, label, n in (("train", "pos", n_train), ("train", "neg", n_train), ("test", "pos", n_test),
                                ("test", "neg", n_test), ("train", "unsup", n_unsup)):
            vocab = NEUTRAL + (POSITIVE if label == "pos" else NEGATIVE if label == "neg" else POSITIVE + NEGATIVE)
            for i in range(n):
                text = " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + ".<br /><br />The end."
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{7 if label == 'pos' else 2}.txt")
                data = text.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def tiny_imdb(tmp_path_factory):
    return write_tiny_imdb(tmp_path_factory.mktemp("imdb") / "aclImdb_v1.tar.gz")


def log_softmax_at(row, index):
    """log softmax(row)[index] in float64 with plain Python: row is a list of floats."""
    m = max(row)
    return row[index] - (m + math.log(sum(math.exp(z - m) for z in row)))


# ---------------------------------------------------------------------------- tiny models and checkpoints
import dataclasses  # noqa: E402

import torch  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def brute_response_logps(logits, tokens, response_mask):
    """Per row: (sum, count) over t >= 1 with response_mask[t] of log_softmax(logits[t - 1])[tokens[t]], Python loops."""
    logits, tokens, response_mask = logits.double().tolist(), tokens.tolist(), response_mask.tolist()
    out = []
    for b in range(len(tokens)):
        total, count = 0.0, 0
        for t in range(1, len(tokens[b])):
            if response_mask[b][t]:
                total += log_softmax_at(logits[b][t - 1], tokens[b][t])
                count += 1
        out.append((total, count))
    return out


def gather_case(seed=0, B=4, T=12, V=23, dtype=torch.float32):
    """Rows with prompts of 1..3 tokens, responses of different lengths and right padding of 0, 2, 4, ... positions."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    spans = []
    for b in range(B):
        start, end = 1 + b % 3, T - 2 * b
        response_mask[b, start:end] = True
        spans.append((start, end))
    return logits, tokens, response_mask, spans


def tiny_gpt(seed=0, vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16):
    """A small GPT with the model's own initialisation, the same weights for the same arguments."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd))


def sharp_gpt(seed=0, vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32):
    """A small GPT whose weights are large enough that logits are O(1): a wrong mask, position or
    cache entry then moves the logits far beyond any tolerance, and greedy choices are not near ties."""
    model = tiny_gpt(seed, vocab_size, block_size, n_layer, n_head, n_embd)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


def save_tiny_checkpoint(path, model=None, kind="sft"):
    """A checkpoint of ours holding model (default: tiny_gpt()), as the trainers write one. Returns its path."""
    model = model if model is not None else tiny_gpt()
    save_checkpoint(str(path), {"kind": kind, "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                                "config": {}, "step": 0})
    return str(path)


class NoTruthValue(torch.nn.Module):
    """Calls the module it wraps and, like torch.compile's wrapper, has no truth value (len() raises)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __len__(self):
        raise TypeError("this wrapper does not support len()")


# ---------------------------------------------------------------------------- crash tests
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402


def kill_when_written(argv, path, cwd, env):
    """Run python argv and SIGKILL it as soon as `path` (its first checkpoint) exists; it must not finish first."""
    proc = subprocess.Popen([sys.executable] + argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
