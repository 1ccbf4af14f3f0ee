"""GPT decoder: KV cache, left padding, causality, the tied head, and the config's checks."""
import pytest
import torch

from conftest import sharp_gpt
from model import GPTConfig, KVCache

TOL = dict(rtol=1e-5, atol=1e-5)


def random_tokens(n, vocab_size, seed):
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- forward, cache, padding
def test_forward_returns_logits_for_every_position():
    model = sharp_gpt()
    idx = torch.randint(0, 101, (3, 7))
    assert model(idx).shape == (3, 7, 101)


def test_lm_head_is_tied_to_token_embedding():
    model = sharp_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[5].fill_(0.25)
    assert torch.all(model.lm_head.weight[5] == 0.25)


def test_sequence_longer_than_block_size_raises_value_error():
    model = sharp_gpt(block_size=16)
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    KVCache(model.config, 1, 16, "cpu", torch.float32)  # a cache of exactly the context is fine
    with pytest.raises(ValueError, match="context of 16"):
        KVCache(model.config, 1, 17, "cpu", torch.float32)


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "with_mask"])
def test_changing_a_future_token_never_changes_earlier_logits(padded):
    model = sharp_gpt()
    T = 10
    idx = random_tokens(T, 101, seed=1)[None]
    mask = torch.ones(1, T, dtype=torch.long) if padded else None
    with torch.no_grad():
        base = model(idx, attention_mask=mask)
        for t in range(T):
            changed = idx.clone()
            changed[0, t] = (changed[0, t] + 7) % 101
            logits = model(changed, attention_mask=mask)
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert (logits[:, t] - base[:, t]).abs().max() > 1e-2  # the changed position itself does move


def test_kv_cache_decoding_matches_full_forward():
    model = sharp_gpt()
    T = 14
    idx = random_tokens(T, 101, seed=2)[None]
    mask = torch.ones(1, T, dtype=torch.long)  # every slot real: causality alone hides the ones not written yet

    def slots(a, b):
        return torch.arange(a, b)

    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 1, T, "cpu", torch.float32)
        pieces = [model(idx[:, :5], mask, cache, slots(0, 5))]  # prefill
        pieces += [model(idx[:, t:t + 1], mask, cache, slots(t, t + 1)) for t in range(5, 10)]  # one token at a time
        pieces.append(model(idx[:, 10:], mask, cache, slots(10, T)))  # several new tokens after a prefill
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def left_padded(rows, pad_seed=0):
    """Rows flush right; the padding holds random token ids, which the mask must hide."""
    width = max(len(r) for r in rows)
    ids = torch.randint(0, 101, (len(rows), width), generator=torch.Generator().manual_seed(pad_seed))
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def test_left_padded_batch_matches_each_row_run_alone():
    model = sharp_gpt()
    rows = [random_tokens(n, 101, seed=10 + n) for n in (9, 4, 1, 6)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(batched[i, ids.shape[1] - len(row):], alone, **TOL)


def test_left_padded_kv_cache_decoding_matches_each_row_run_alone():
    """The static cache: slots beyond the prompt hold garbage until written, hidden by the mask, which
    grows by one slot per step, as the sampler's Decoder does it."""
    model = sharp_gpt()
    prompts = [random_tokens(n, 101, seed=20 + n) for n in (7, 2, 5)]
    continuation = torch.randint(0, 101, (3, 6), generator=torch.Generator().manual_seed(3))  # teacher-forced
    ids, prompt_mask = left_padded(prompts, pad_seed=4)
    width = ids.shape[1]
    with torch.no_grad():
        cache = KVCache(model.config, 3, width + 6, "cpu", torch.float32)
        cache.k.normal_(), cache.v.normal_()  # garbage in the unwritten slots must not leak in
        mask = torch.zeros(3, width + 6, dtype=torch.long)
        mask[:, :width] = prompt_mask
        steps = [model(ids, mask, cache, torch.arange(width))[:, -1]]
        for t in range(5):
            mask[:, width + t] = 1
            steps.append(model(continuation[:, t:t + 1], mask, cache, torch.tensor([width + t]))[:, -1])
        decoded = torch.stack(steps, dim=1)  # (B, 6, V): logits after the prompt and after each new token
        for i, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[i, :5]])[None])[0]  # (len + 5, V)
            torch.testing.assert_close(decoded[i], alone[len(prompt) - 1:], **TOL)


# ---------------------------------------------------------------------------- model config
@pytest.mark.parametrize("field,value", [
    ("n_layer", "2"), ("n_head", 0), ("n_embd", -32), ("vocab_size", True), ("block_size", 16.0),
    ("n_layer", None), ("dropout", 1.0), ("dropout", -0.1), ("dropout", "0.1"), ("dropout", True),
    ("dropout", float("nan")),
])
def test_model_config_of_wrong_type_or_range_is_refused_naming_the_field(field, value):
    sizes = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError) as error:
        GPTConfig(**{**sizes, field: value})
    message = str(error.value)
    assert message.startswith(f"GPTConfig {field} must be") and repr(value) in message


def test_model_config_whose_heads_do_not_split_n_embd_is_refused():
    with pytest.raises(ValueError, match="n_embd 30 does not split into 4 whole heads"):
        GPTConfig(n_embd=30, n_head=4)
