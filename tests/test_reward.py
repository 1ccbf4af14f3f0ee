"""The two sentiment classifiers: the n-gram reward (hashing, the logit, the naive Bayes start)
against brute-force loops in Python integers and float64, and both kinds end to end."""
import math

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from cli import UserError
from conftest import save_tiny_checkpoint, tiny_gpt
from data import EOT, TokenizedSplit
from reward import VOCAB, NgramClassifier, NgramConfig, RewardConfig, load_classifier, naive_bayes_ratios, train_reward, word_ids


def ngram_model(order=3, bits=12, seed=0):
    model = NgramClassifier(NgramConfig(order, bits), word_ids())
    with torch.no_grad():
        model.table.weight.normal_(generator=torch.Generator().manual_seed(seed))
        model.bias.fill_(0.3)
    return model


def brute_force_buckets(words, order, bits):
    """Every n-gram (n = 1..order) of a word list, hashed with Python integers mod 2**64."""
    out = []
    for n in range(1, order + 1):
        for i in range(len(words) - n + 1):
            gram = 0
            for k in range(n):
                gram = (gram * VOCAB + words[i + k]) % 2**64 if k else words[i]
            out.append((((gram + n) % 2**64) * 0x9E3779B97F4A7C15 % 2**64) >> (64 - bits))
    return sorted(out)


def test_words_merge_case_and_spaces():
    from data import get_encoding
    enc, words = get_encoding(), word_ids()
    great = [enc.encode(text) for text in (" Great", "great", " GREAT", " great")]
    assert all(len(t) == 1 for t in great)
    assert len({int(words[t[0]]) for t in great}) == 1
    assert words[enc.encode(" good")[0]] != words[enc.encode(" bad")[0]]


@pytest.mark.parametrize("order", [1, 2, 4])
def test_ngram_buckets_equal_brute_force_hashing(order):
    model = ngram_model(order=order, bits=14)
    tokens = [464, 3807, 373, 1049, 0, 50256, 13, 464, 3807]
    words = [int(model.words[t]) for t in tokens]
    assert sorted(model.ngrams(tokens).tolist()) == brute_force_buckets(words, order, 14)
    assert len(model.ngrams(tokens)) == sum(len(tokens) - n + 1 for n in range(1, order + 1))


def test_ngram_logit_is_bias_plus_weight_sum_over_sqrt_count_in_float64():
    model = ngram_model()
    sequences = [[464, 3807, 373, 1049], [1049], [40, 1842, 340, 13, 13, 13, 40, 1842]]
    logits = model(sequences)
    table = model.table.weight[:, 0].double()
    for sequence, logit in zip(sequences, logits):
        buckets = brute_force_buckets([int(model.words[t]) for t in sequence], 3, 12)
        expected = 0.3 + sum(table[b].item() for b in buckets) / math.sqrt(len(buckets))
        assert logit.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    scores = model.score(sequences)
    assert scores == pytest.approx(torch.sigmoid(logits.double()).detach().numpy(), abs=1e-6)


def test_naive_bayes_ratios_equal_brute_force_counts():
    """log P(g | pos) - log P(g | neg), each n-gram counted once per review, add-one smoothing."""
    model = ngram_model(order=2, bits=10)
    docs = [[464, 3807, 373, 1049, 1049], [464, 3807, 373, 2089], [1049, 1049, 13], [2089, 13]]
    labels = np.array([1, 0, 1, 0])
    offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])])
    split = TokenizedSplit(np.array([t for d in docs for t in d + [EOT]], dtype=np.uint16), offsets, labels)
    counts = [[0] * 2**10, [0] * 2**10]
    for doc, label in zip(docs, labels):
        for b in set(brute_force_buckets([int(model.words[t]) for t in doc], 2, 10)):
            counts[label][b] += 1
    totals = [sum(c) + 2**10 for c in counts]
    expected = [math.log((counts[1][b] + 1) / totals[1]) - math.log((counts[0][b] + 1) / totals[0]) for b in range(2**10)]
    assert naive_bayes_ratios(model, split) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def separable_imdb(n_train=2048, n_test=128):
    """Reviews with token 5 are positive, with token 6 negative."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 2
        docs = [list(rng.integers(10, 40, size=int(rng.integers(6, 12)))) for _ in range(n)]
        for doc, label in zip(docs, labels):
            doc[int(rng.integers(0, len(doc)))] = 5 if label else 6
        offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])])
        tokens = np.array([t for d in docs for t in d + [EOT]], dtype=np.uint16)
        return TokenizedSplit(tokens, offsets, labels)
    return {"train": split(n_train), "test": split(n_test)}


@pytest.mark.parametrize("kind", ["ngram", "gpt"])
def test_classifier_learns_a_separable_task_and_reloads_frozen(tmp_path, kind):
    imdb = separable_imdb()
    save_tiny_checkpoint(tmp_path / "sft.pt", tiny_gpt(block_size=16))
    cfg = RewardConfig(kind=kind, sft=str(tmp_path / "sft.pt"), out=str(tmp_path), max_len=16, min_len=4, batch_size=32,
                       steps=100, lr=5e-3 if kind == "ngram" else 2e-3, bits=16, warmup_steps=5, test_reviews=0,
                       log_interval=40, device="cpu")
    path, accuracy = train_reward(cfg, imdb)
    assert set(accuracy) == {"acc_32", "acc_64", "acc_full"} and accuracy["acc_full"] >= 0.9
    model = load_classifier(path)
    assert not any(p.requires_grad for p in model.parameters())
    assert "optimizer" not in load_checkpoint(path)  # frozen: no optimizer state travels with it
    scores = model.score([imdb["test"].review(i).tolist() for i in range(20)])
    assert np.all((scores >= 0) & (scores <= 1))
    assert np.mean((scores > 0.5) == (imdb["test"].labels[:20] == 1)) >= 0.9
    # a finished classifier is returned as it is, and one made with other settings is refused, untouched
    assert train_reward(cfg, imdb) == (path, accuracy)
    before = open(path, "rb").read()
    with pytest.raises(UserError, match="different settings"):
        train_reward(RewardConfig(**{**cfg.__dict__, "seed": 1}), imdb)
    assert open(path, "rb").read() == before
