"""
A GPT-2 decoder in one file: token + learned position embeddings, pre-LayerNorm blocks,
causal self-attention (scaled_dot_product_attention), a GELU MLP and an output head tied to
the token embedding. Parameter names match GPT-2's checkpoints one to one, so pretrained.py's
`load_gpt2` copies the published weights, or a GPT-2 saved by Hugging Face's `save_pretrained`, in by name.

`forward(idx)` returns logits for every position, (B, T, vocab): DPO needs all of them.
With `output_vocab` K, the head scores only K tokens, the GPT-2 ids `output_ids` (sorted): logits are
(B, T, K), row r scoring token output_ids[r], and the model never emits another token. The input side
still embeds every GPT-2 id. On a small model the head over 50,257 tokens is most of the compute.
Left-padded batches are supported through `attention_mask` (1 = real token, 0 = padding), and a
static `KVCache` makes generation cost one position per step, with the same shapes at every step.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # GPT-2 BPE (tiktoken r50k_base)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # DPO and sampling run with dropout off
    output_vocab: int = 0  # 0: the head scores every token; K: only K of them, the model's output_ids (a CPU saving)

    @property
    def head_tokens(self):
        """How many tokens the head scores: output_vocab, or every token."""
        return self.output_vocab or self.vocab_size

    def __post_init__(self):
        """Refuse sizes no GPT has (a damaged checkpoint's model_config, say) with a one-line ValueError."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig n_embd {self.n_embd} does not split into {self.n_head} whole heads; "
                             f"pick an n_head that divides n_embd")
        if not isinstance(self.output_vocab, int) or isinstance(self.output_vocab, bool) or not 0 <= self.output_vocab <= self.vocab_size:
            raise ValueError(f"GPTConfig output_vocab must be an int in [0, vocab_size {self.vocab_size}], got {self.output_vocab!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPTConfig dropout must be a number in [0, 1), got {self.dropout!r}")


class KVCache:
    """Keys and values of every layer, preallocated for max_len slots: (layers, B, heads, max_len, head_dim).
    A forward writes its T tokens at the slots `cache_at` (a device tensor, not a Python int) and attends
    over all max_len slots, the ones not written yet hidden by the attention mask. So every decode step
    has the same shapes and reads the same buffers, and one CUDA graph can replay them all."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        if max_len > config.block_size:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of {config.block_size}")
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        # zeros, not empty: a masked slot gets attention weight 0, and 0 * NaN (garbage memory) would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer, k, v, cache_at):
        """Store this forward's k, v (B, H, T, D) of `layer` at slots cache_at (T,); return every slot's (B, H, max_len, D)."""
        self.k[layer].index_copy_(2, cache_at, k)
        self.v[layer].index_copy_(2, cache_at, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, layer, visible=None, cache=None, cache_at=None):
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.n_head) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_at)  # (B, H, S, D): every slot of the cache
        dropout = self.dropout if self.training else 0.0
        if visible is None:  # plain causal attention over a full, unpadded sequence (flash path)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout)
        y = rearrange(y, "b h t d -> b t (h d)")
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, layer, visible=None, cache=None, cache_at=None):
        x = x + self.attn(self.ln_1(x), layer, visible, cache, cache_at)
        return x + self.mlp(self.ln_2(x))


def visibility_mask(attention_mask, query_at):
    """(B, 1, T, S) bool: the query at position query_at[i] may attend key j iff j <= query_at[i] and key j
    is a real token (attention_mask (B, S), 1 = real). A query always sees itself, so a padding query
    has a defined (unused) output instead of NaN."""
    query = query_at[:, None]  # (T, 1)
    key = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]  # (1, S)
    visible = (key <= query) & attention_mask[:, None, None, :].bool()
    return visible | (key == query)


def position_ids_from_mask(attention_mask):
    """Left padding shifts each row, so a row's first real token gets position 0. (B, S)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences, pad=0, device="cpu", width=None):
    """Token lists -> (ids, attention_mask), both (B, width), real tokens flush right; width: the longest by default."""
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        # the GPT-2 ids the head scores, sorted (sft.py sets them), or None: all of them, row r scoring id r
        self.register_buffer("output_ids", torch.arange(config.output_vocab) if config.output_vocab else None)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def head(self, features):
        """The LM head, tied to the token embedding: logits over every token, or over output_ids only."""
        if self.output_ids is None:
            return self.lm_head(features)
        # index_select, not weight[output_ids]: the same rows, a quarter of the time on a CPU (a decode step's cost)
        return F.linear(features, self.transformer.wte.weight.index_select(0, self.output_ids))

    def output_rows(self, ids):
        """The logit rows that score GPT-2 `ids` (the ids themselves with the full head); -1 for an id the
        head does not score, which the model never emits."""
        if self.output_ids is None:
            return ids
        rows = torch.searchsorted(self.output_ids, ids.contiguous()).clamp(max=len(self.output_ids) - 1)
        return torch.where(self.output_ids[rows] == ids, rows, -1)

    def output_tokens(self, rows):
        """The GPT-2 ids of logit rows (e.g. sampled ones): output_rows' inverse."""
        return rows if self.output_ids is None else self.output_ids[rows]

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Forward + backward FLOPs per trained token (PaLM appendix B): 6N + 12 L C T, N = multiplied_params()."""
        return 6 * self.multiplied_params() + 12 * self.config.n_layer * self.config.n_embd * seq_len

    def multiplied_params(self):
        """The parameters a token's forward multiplies: all but wpe's and, with a restricted head, the
        embedding rows of the tokens it does not score (looked up as inputs, never multiplied)."""
        c = self.config
        return self.num_params() - (c.vocab_size - c.head_tokens) * c.n_embd

    def hidden_states(self, idx, attention_mask=None, cache=None, cache_at=None):
        """Final-LayerNorm features (B, T, C). Without a cache, attention_mask (B, T) marks the real tokens
        of idx. With a cache, the T tokens go to its slots cache_at (T,), a long tensor, and
        attention_mask (B, max_len) marks every real token in the cache, these T included."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.config.block_size}")
            cache_at = torch.arange(T, device=idx.device)
        elif attention_mask is None or cache_at is None:
            raise ValueError("a forward with a cache needs attention_mask over its slots and cache_at, the slots of idx")
        if attention_mask is not None:
            pos = position_ids_from_mask(attention_mask).index_select(1, cache_at)  # (B, T)
            visible = visibility_mask(attention_mask, cache_at)
        else:
            pos, visible = cache_at, None  # plain causal attention over a full, unpadded sequence
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, layer, visible, cache, cache_at)
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, cache=None, cache_at=None, positions=None):
        """Logits for every position: logits[:, t] predicts idx[:, t + 1]. (B, T, vocab), or (B, T, output_vocab)
        positions, a bool mask (B, T): the logits of those positions only, (N, vocab) in row-major
        order. The LM head is most of a small model's compute, and a loss needs it only where it
        predicts a token it scores."""
        features = self.hidden_states(idx, attention_mask, cache, cache_at)
        return self.head(features if positions is None else features[positions])
