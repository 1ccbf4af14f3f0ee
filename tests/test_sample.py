"""Sampling: greedy / top-k / nucleus draws against hand-computed supports and frequencies, batched
generation against a brute-force greedy loop, and stopping at end-of-text."""

import numpy as np
import pytest
import torch

import sample
from cli import UserError
from conftest import save_tiny_checkpoint, sharp_gpt, tiny_gpt
from data import EOT
from model import left_pad


def draws(logits_row, n, **kwargs):
    """n independent draws from one row of logits, as a NumPy array of token ids."""
    logits = torch.tensor(logits_row, dtype=torch.float32).repeat(n, 1)
    return sample.next_token(logits, generator=torch.Generator().manual_seed(0), **kwargs).numpy()


# ---------------------------------------------------------------------------- next_token
def test_temperature_zero_is_argmax():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    expected = [int(np.argmax(row)) for row in logits.numpy()]
    assert sample.next_token(logits, temperature=0).tolist() == expected


def test_top_k_one_is_argmax_at_any_temperature():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    expected = [int(np.argmax(row)) for row in logits.numpy()]
    for temperature in (0.5, 1.0, 5.0):
        got = sample.next_token(logits, temperature=temperature, top_k=1, generator=torch.Generator().manual_seed(3))
        assert got.tolist() == expected


def test_top_k_draws_only_the_k_likeliest_tokens():
    logits_row = np.random.default_rng(4).standard_normal(50)
    top5 = set(np.argsort(-logits_row)[:5].tolist())
    got = draws(logits_row, 20_000, temperature=2.0, top_k=5)
    assert set(got.tolist()) == top5  # all five drawn, nothing else


def test_temperature_scales_logits_before_sampling():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    got = draws(np.log(p), 100_000, temperature=0.5)
    expected = p ** 2 / (p ** 2).sum()  # softmax(log p / 0.5)
    np.testing.assert_allclose(np.bincount(got, minlength=4) / len(got), expected, atol=0.01)


def test_sampling_matches_the_probabilities_and_never_draws_a_zero_probability_token():
    """Inverse-CDF sampling: frequencies within 0.01 of the probabilities over 100k draws, and tokens of
    probability 0 (first, middle, last: the edges of the cumulative sum) are never drawn."""
    probs = np.array([0.0, 0.15, 0.0, 0.6, 0.25, 0.0])
    with np.errstate(divide="ignore"):
        logits = np.log(probs)  # -inf where the probability is 0
    got = draws(logits, 100_000)
    np.testing.assert_allclose(np.bincount(got, minlength=6) / len(got), probs, atol=0.01)
    assert not set(got.tolist()) & {0, 2, 5}


def nucleus(probs, top_p):
    """Brute force: the smallest set of tokens, likeliest first, whose probability reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return set(kept)


def test_top_p_draws_stay_inside_the_nucleus_with_renormalised_frequencies():
    probs = np.array([0.05, 0.3, 0.02, 0.4, 0.03, 0.2])  # shuffled so the sort and scatter are exercised
    top_p = 0.6
    kept = nucleus(probs, top_p)
    assert kept == {3, 1}
    got = draws(np.log(probs), 50_000, top_p=top_p)
    assert set(got.tolist()) == kept
    np.testing.assert_allclose(np.mean(got == 3), 0.4 / 0.7, atol=0.01)


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.875])
def test_top_p_keeps_the_smallest_set_when_its_mass_equals_top_p_exactly(top_p):
    """Powers of two are exact in float32, so the set {0.5, 0.25} reaches 0.75 exactly: the nucleus
    for top_p=0.75 is those two tokens, not three (Holtzman et al.: smallest set with mass >= p)."""
    probs = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])
    kept = nucleus(probs, top_p)
    got = draws(np.log(probs), 20_000, top_p=top_p)
    assert set(got.tolist()) <= kept, f"drew {sorted(set(got.tolist()) - kept)} outside the nucleus {sorted(kept)}"


# ---------------------------------------------------------------------------- generate
def brute_force_greedy(model, prompt, max_new_tokens):
    """Greedy decoding with a full forward pass over the whole sequence at every step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_generation_of_mixed_length_prompts_matches_one_at_a_time():
    model = sharp_gpt()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 101, size=n).tolist() for n in (1, 7, 3, 12, 5)]
    batched = sample.generate(model, prompts, 10, temperature=0)
    one_at_a_time = [sample.generate(model, [p], 10, temperature=0)[0] for p in prompts]
    expected = [brute_force_greedy(model, p, 10) for p in prompts]
    assert one_at_a_time == expected
    assert batched == expected
    assert sample.generate(model, prompts, 10, temperature=0, batch_size=2) == expected


def test_generation_can_fill_the_context_exactly():
    model = sharp_gpt(block_size=16)
    prompt = [3, 1, 4, 1, 5, 9]
    assert sample.generate(model, [prompt], 10, temperature=0) == [brute_force_greedy(model, prompt, 10)]


def test_prompt_plus_new_tokens_beyond_the_context_raises_user_error():
    model = sharp_gpt(block_size=16)
    with pytest.raises(UserError, match="context of 16"):
        sample.generate(model, [[1] * 3, [2] * 10], 7, temperature=0)  # 10 + 7 > 16


def test_empty_prompt_raises_user_error():
    model = sharp_gpt()
    with pytest.raises(UserError, match="empty prompt"):
        sample.generate(model, [[1, 2], []], 4, temperature=0)


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    """A tiny-width model over GPT-2's full vocabulary, so end-of-text (50256) is a valid token."""
    return tiny_gpt(block_size=64, n_head=1, n_embd=8).eval()


def scripted_next_token(script):
    """Replace next_token: step t returns script[row][t] for every row, whatever the logits."""
    calls = []

    def next_token(logits, *args, **kwargs):
        t = len(calls)
        calls.append(t)
        assert logits.shape == (len(script), 50257)
        return torch.tensor([row[t] for row in script])

    return next_token, calls


def test_completions_are_cut_before_the_first_end_of_text(monkeypatch, gpt2_vocab_model):
    script = [[11, 12, EOT, 13, 14, 15, 16, 17],
              [21, EOT, EOT, 22, 23, 24, 25, 26],
              [31, 32, 33, 34, 35, 36, 37, 38],
              [EOT, 41, 42, 43, 44, 45, 46, 47]]
    fake, _ = scripted_next_token(script)
    monkeypatch.setattr(sample, "next_token", fake)
    got = sample.generate(gpt2_vocab_model, [[464], [464, 3807], [40], [1212, 318, 257]], 8, temperature=1.0)
    assert got == [[11, 12], [21], [31, 32, 33, 34, 35, 36, 37, 38], []]

    fake, _ = scripted_next_token(script)
    monkeypatch.setattr(sample, "next_token", fake)
    raw = sample.generate(gpt2_vocab_model, [[464], [464, 3807], [40], [1212, 318, 257]], 8, stop_at_eot=False)
    assert raw == script  # without stopping, every drawn token comes back


def test_every_batch_takes_exactly_max_new_tokens_draws_with_no_early_exit(monkeypatch, gpt2_vocab_model):
    """A fixed number of decode steps (nothing asks the host whether every row has ended), and a row
    that has ended emits end-of-text whatever is drawn for it."""
    script = [[5, EOT] + [7] * 38, [EOT] + [8] * 39]
    fake, calls = scripted_next_token(script)
    monkeypatch.setattr(sample, "next_token", fake)
    assert sample.generate(gpt2_vocab_model, [[464], [40, 41]], 40) == [[5], []]
    assert len(calls) == 40


def test_model_that_always_predicts_end_of_text_gives_empty_completions():
    model = tiny_gpt(n_head=1, n_embd=8).eval()
    with torch.no_grad():  # final LayerNorm outputs the constant vector e; only EOT's embedding points along e
        e = torch.zeros(8)
        e[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(e)
        model.transformer.wte.weight[:, 0] = -1.0
        model.transformer.wte.weight[EOT, 0] = 1.0
    assert sample.generate(model, [[464, 3807], [40]], 12, temperature=0) == [[], []]
    assert sample.generate(model, [[464, 3807]], 3, temperature=0, stop_at_eot=False) == [[EOT] * 3]


# ---------------------------------------------------------------------------- the static-cache sampler
def eot_prone_gpt():
    """A float64 GPT over GPT-2's vocabulary that often draws end-of-text at temperature
    1, so rows of one batch end at different steps."""
    model = tiny_gpt(vocab_size=50257, block_size=32, n_embd=16).double().eval()
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 3.0
        model.transformer.wte.weight[EOT] = 0.0
        model.transformer.wte.weight[EOT, 0] = 2.2
    return model


def full_recompute_sample(model, prompts, max_new_tokens, generator, stop_at_eot=True):
    """The plain sampler the static cache must equal: no cache, the whole left-padded sequence through the
    model at every step, the same next_token and the same draws of the generator, ended rows fed end-of-text."""
    sequences, done = [list(p) for p in prompts], torch.zeros(len(prompts), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids, mask = left_pad(sequences)
            token = sample.next_token(model(ids, attention_mask=mask)[:, -1], generator=generator)
            token = torch.where(done, EOT, token)
            done |= (token == EOT) & stop_at_eot
            for sequence, t in zip(sequences, token.tolist()):
                sequence.append(t)
    out = [s[len(p):] for s, p in zip(sequences, prompts)]
    return [c[:c.index(EOT)] if stop_at_eot and EOT in c else c for c in out]


MIXED_PROMPTS = [[464], [40, 41, 42], [1212, 318, 257, 4, 5, 6, 7], [9], [33, 44], [7] * 11]


@pytest.mark.parametrize("stop_at_eot", [True, False])
def test_static_cache_sampler_draws_the_tokens_of_a_full_recompute_sampler_in_float64(stop_at_eot):
    """Mixed prompt lengths (left padding, a width bucket wider than the longest prompt), rows ending at
    different steps, batches of 4 (the last one of 2), and the same model used twice (its decoders reused)."""
    model = eot_prone_gpt()
    for _ in range(2):
        got = sample.generate(model, MIXED_PROMPTS, 14, stop_at_eot=stop_at_eot, batch_size=4,
                              generator=torch.Generator().manual_seed(1))
        draws = torch.Generator().manual_seed(1)
        expected = (full_recompute_sample(model, MIXED_PROMPTS[:4], 14, draws, stop_at_eot)
                    + full_recompute_sample(model, MIXED_PROMPTS[4:], 14, draws, stop_at_eot))
        assert got == expected
    lengths = [len(c) for c in got]
    if stop_at_eot:  # end-of-text came mid-batch: some rows ended early, others ran on
        assert min(lengths) < 13 and max(lengths) == 14
    else:
        assert any(EOT in c[:-1] for c in got) and lengths == [14] * len(got)


def test_a_batch_padded_to_its_bucket_draws_what_the_prompts_alone_would():
    """On CUDA a batch pads to a bucket of rows, each padding row a one-token prompt whose samples are
    dropped. The same padded decoder, run eagerly here, draws exactly the full-recompute tokens."""
    model = eot_prone_gpt()
    prompts = MIXED_PROMPTS[:5]
    rows = sample.batch_bucket(len(prompts))
    assert rows == 8
    width = sample.width_bucket(max(len(p) for p in prompts), 12, model.config.block_size)
    decoder = sample.Decoder(model.config, rows, width + 12, "cpu", torch.float64, capture=False)
    with torch.no_grad():
        got = sample.decode(model, decoder, prompts, width, 12, 1.0, 0, 1.0, True, torch.Generator().manual_seed(2))
    assert got == full_recompute_sample(model, prompts, 12, torch.Generator().manual_seed(2))


def test_buckets_are_few_and_never_smaller_than_the_batch():
    assert [sample.batch_bucket(n) for n in (1, 8, 9, 16, 17, 256, 257, 1000, 1024)] == [8, 8, 16, 16, 32, 256, 512, 1024, 1024]
    assert sample.width_bucket(3, 48, 256) == 8 and sample.width_bucket(9, 48, 256) == 16
    assert sample.width_bucket(7, 10, 16) == 7 and sample.width_bucket(5, 10, 16) == 6  # never past the context


def test_sample_py_draws_and_prints_n_in_batches_so_memory_does_not_grow_with_n(tmp_path, monkeypatch, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "sft.pt")
    sizes = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **k: sizes.append(len(prompts)) or real(model, prompts, *a, **k))
    monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", ckpt, "--n", "5", "--batch-size", "2", "--max-new-tokens", "3",
                                     "--device", "cpu"])
    sample.main()
    out = capsys.readouterr().out
    assert sizes == [2, 2, 1] and [f"--- sample {i}\n" in out for i in range(6)] == [True] * 5 + [False]
