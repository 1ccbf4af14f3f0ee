"""
A GPT-2 decoder in one file: token + learned position embeddings, pre-LayerNorm blocks,
causal self-attention (scaled_dot_product_attention), a GELU MLP and an output head tied to
the token embedding. Parameter names match GPT-2's checkpoints one to one, so
`GPT.from_pretrained("gpt2")` loads the published weights, and `GPT.from_pretrained(folder)` a GPT-2
saved by Hugging Face's `save_pretrained`, without any other library.

`forward(idx)` returns logits for every position, (B, T, vocab): DPO needs all of them.
Left-padded batches are supported through `attention_mask` (1 = real token, 0 = padding), and a
static `KVCache` makes generation cost one position per step, with the same shapes at every step.
"""
import json
import math
import os
import struct
import urllib.request
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

    def __post_init__(self):
        """Refuse sizes no GPT has (a damaged checkpoint's model_config, say) with a one-line ValueError."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig n_embd {self.n_embd} does not split into {self.n_head} whole heads; "
                             f"pick an n_head that divides n_embd")
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

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len):
        """Forward + backward FLOPs per trained token (PaLM appendix B): 6N + 12 L C T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

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
        """Logits for every position: logits[:, t] predicts idx[:, t + 1]. (B, T, vocab)
        positions, a bool mask (B, T): the logits of those positions only, (N, vocab) in row-major
        order. The LM head is most of a small model's compute, and a loss needs it only where it
        predicts a token it scores."""
        features = self.hidden_states(idx, attention_mask, cache, cache_at)
        return self.lm_head(features if positions is None else features[positions])

    # ------------------------------------------------------------------ GPT-2 weights
    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """GPT-2 weights: "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" (downloaded from the Hugging
        Face hub when online), a folder written by Hugging Face `save_pretrained` (config.json and
        model.safetensors), or a .safetensors path. A config.json beside the weights gives the head count
        and is checked against what this GPT computes; without one only the published sizes load.
        Raises ValueError for weights or a config this GPT cannot represent."""
        path = name_or_path if os.path.exists(name_or_path) else download_gpt2(name_or_path)
        if os.path.isdir(path):
            folder, path = path, os.path.join(path, "model.safetensors")
            if not os.path.isfile(path):
                raise ValueError(f"{folder} holds no model.safetensors; save the model there with save_pretrained "
                                 f"(as one unsharded safetensors file) or pass a .safetensors path")
        tensors = read_safetensors(path)
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()
                   if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
        for name in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight"):
            if name not in tensors:
                raise ValueError(f"{path} does not hold GPT-2 weights (no '{name}' tensor)")
        model = cls(GPTConfig(**gpt2_sizes(path, tensors), dropout=dropout))
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        if set(ours) != set(tensors):
            missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
            raise ValueError(f"{path}: tensor names differ from GPT-2's; missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, param in ours.items():
                src = tensors[name]
                if name.endswith(conv1d):  # GPT-2 stores these as Conv1D (in, out); nn.Linear wants (out, in)
                    src = src.t()
                if src.shape != param.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
                param.copy_(src)
        return model


GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# config.json fields under which Hugging Face's GPT-2 computes something this GPT does not, and the values
# it does compute (the first is HF's default, so an absent field is standard too)
STANDARD_GPT2 = {
    "model_type": ("gpt2",),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are GELU's tanh approximation
    "layer_norm_epsilon": (1e-5,),  # nn.LayerNorm's default eps
    "scale_attn_weights": (True,),  # scores / sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),  # our lm_head is wte
}


def gpt2_sizes(path, tensors):
    """GPTConfig sizes of GPT-2 weights. All but the head count are tensor shapes; the head count comes from
    the config.json beside the weights, else from the published sizes. It can't be read off the tensors:
    the same 32-wide weights split into 1, 2, 4 ... heads give different logits."""
    vocab_size, n_embd = tensors["wte.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("h."))
    found = dict(vocab_size=vocab_size, n_positions=tensors["wpe.weight"].shape[0], n_embd=n_embd, n_layer=n_layer)
    config_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(config_path):
        n_head = gpt2_n_head(config_path, found)
    else:
        published = {(s["n_layer"], s["n_embd"]): s["n_head"] for s in GPT2_SIZES.values()}
        if (n_layer, n_embd) not in published:
            raise ValueError(f"{path}: a {n_layer}-layer, {n_embd}-wide GPT-2 is not a published size, so its head "
                             f"count is unknown; put the model's config.json (from save_pretrained) beside it")
        n_head = published[n_layer, n_embd]
    return dict(block_size=found["n_positions"], vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def gpt2_n_head(config_path, found):
    """n_head of a Hugging Face GPT-2 config.json, after checking that the config describes the weights
    (`found`: the sizes their shapes give) and a model this GPT computes exactly."""
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not a JSON config ({e})") from None
    for field, value in found.items():  # (n_ctx, in older configs, sized only HF's mask buffer; n_positions sizes wpe)
        if field in hf and hf[field] != value:
            raise ValueError(f"{config_path}: {field} is {hf[field]} but the weights beside it have {value}; "
                             f"put the config.json saved with these weights beside them")
    n_head = hf.get("n_head")
    if not isinstance(n_head, int) or n_head <= 0 or found["n_embd"] % n_head:
        raise ValueError(f"{config_path}: n_head is {json.dumps(n_head)}, which does not split n_embd "
                         f"{found['n_embd']} into whole heads; set the model's head count there")
    for field, allowed in {**STANDARD_GPT2, "n_inner": (None, 4 * found["n_embd"])}.items():
        if hf.get(field, allowed[0]) not in allowed:
            standard = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"{config_path}: {field} is {json.dumps(hf[field])}, but this GPT only represents "
                             f"standard GPT-2 ({field} {standard}); use a standard GPT-2 model")
    return n_head


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    """The safetensors format: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes. The whole header is
    checked before any tensor is read: a damaged file raises ValueError instead of loading wrong bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}); pass a .safetensors file") from None
    if len(raw) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise ValueError(f"{path} is not a safetensors file or is truncated (header length {header_len} exceeds "
                         f"the file's {len(raw)} bytes); download or save it again")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (bad header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, "
                         f"not an object); pass a .safetensors file")
    data = memoryview(raw)[8 + header_len:]
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in entries.items():
        check_safetensors_entry(path, name, info, len(data))
    spans = sorted((*info["data_offsets"], name) for name, info in entries.items())
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:  # else one tensor's bytes would load as another's
            raise ValueError(f"{path}: tensors {name} and {other} share bytes (their data_offsets overlap); "
                             f"the file is damaged: download or save it again")
    tensors = {}
    for name, info in entries.items():
        (begin, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).float()
    return tensors


def check_safetensors_entry(path, name, info, data_len):
    """Raise ValueError unless header entry `name` has a known dtype, a shape of sizes, and data_offsets
    [begin, end] inside the data_len data bytes that span exactly the shape's bytes."""
    def is_size(n):
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    fields = info if isinstance(info, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not isinstance(info, dict):
        problem = f"is {json.dumps(info)[:40]}, not an object"
    elif not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        problem = f"has dtype {json.dumps(dtype)}, not one of {', '.join(SAFETENSORS_DTYPES)}"
    elif not (isinstance(shape, list) and all(is_size(n) for n in shape)):
        problem = f"has shape {json.dumps(shape)}, not a list of sizes"
    elif not (isinstance(offsets, list) and len(offsets) == 2 and all(is_size(n) for n in offsets)
              and offsets[0] <= offsets[1] <= data_len):
        problem = f"has data_offsets {json.dumps(offsets)}, not [begin, end] within the {data_len} data bytes"
    elif offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        problem = (f"has shape {shape} of {dtype}, {math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize} bytes, "
                   f"but its data_offsets span {offsets[1] - offsets[0]} bytes")
    else:
        return
    raise ValueError(f"{path}: tensor {name} {problem}; the file is damaged: download or save it again")


def download_gpt2(name):
    """The hub's config.json and model.safetensors for a published GPT-2, cached in data/gpt2/NAME
    (or $GPT2_CACHE_DIR/NAME); returns that folder."""
    if name not in GPT2_SIZES:
        raise ValueError(f"{name!r} is neither a published GPT-2 ({', '.join(GPT2_SIZES)}) nor an existing folder or "
                         f".safetensors file")
    folder = os.path.join(os.environ.get("GPT2_CACHE_DIR", "data/gpt2"), name)
    if not os.path.exists(os.path.join(folder, "model.safetensors")):  # a cached model.safetensors alone loads too
        os.makedirs(folder, exist_ok=True)
        for file in ("config.json", "model.safetensors"):
            url, cache = f"https://huggingface.co/{name}/resolve/main/{file}", os.path.join(folder, file)
            print(f"downloading {url} -> {cache}")
            try:
                urllib.request.urlretrieve(url, cache + ".part")
            except OSError as e:
                raise SystemExit(f"could not download {url} ({e}); download config.json and model.safetensors "
                                 f"from https://huggingface.co/{name} into {folder} by hand") from None
            os.replace(cache + ".part", cache)
    return folder
