"""
The paper's ground truth when a user has it: a RoBERTa sequence classifier (the paper used
siebert/sentiment-roberta-large-english), in plain PyTorch, read from its save_pretrained folder with
no other library, scoring our GPT-2 token ids as r(x, y) = P(positive | x + y).

The encoder: token + position + token-type embeddings and a LayerNorm; post-LN blocks (self-attention
over the unpadded tokens, then a GELU MLP, each added to its input and then normalised); the
classification head reads the <s> token: out_proj(tanh(dense(h))). Position ids start after the padding
id, as in RoBERTa: the first real token has position pad + 1.

Tokens. RoBERTa encodes text with GPT-2's byte-level BPE and numbers the tokens its own way (fairseq's
RoBERTa encodes with the GPT-2 BPE, then maps through its dictionary: facebookresearch/fairseq#1432).
So a GPT-2 token becomes a RoBERTa id through its string in vocab.json, and <s> ... </s> wrap the text.
That holds when the folder's merges.txt is GPT-2's, which is checked on loading; a folder with other
merges is refused. End-of-text tokens (GPT-2's document separator) are dropped.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from checkpoint import file_digest
from cli import UserError
from data import byte_to_unicode, get_encoding, tokenizer_files
from device import autocast
from pretrained import read_safetensors


@dataclass
class RobertaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int  # positions pad + 1 ... : max_position_embeddings - pad - 1 tokens at most
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    num_labels: int = 2
    positive: int = 1  # the label whose probability is the reward


class Block(nn.Module):
    """One post-LN encoder layer, under Hugging Face's parameter names (attention.self.query, ...)."""

    def __init__(self, c):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(c.hidden_size, c.hidden_size))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention.output.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.output.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.n_head = c.num_attention_heads

    def forward(self, x, mask):
        """x (B, T, C); mask (B, T) bool, True on real tokens: padding is never attended to."""
        a = self.attention.self
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.n_head) for proj in (a.query, a.key, a.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # softmax(q k / sqrt(d)) v
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(rearrange(y, "b h t d -> b t (h d)")))
        return self.output.LayerNorm(x + self.output.dense(F.gelu(self.intermediate.dense(x))))  # exact (erf) GELU


class RobertaClassifier(nn.Module):
    """RobertaForSequenceClassification's computation: ids (B, T) of RoBERTa's vocabulary, right-padded,
    mask (B, T) -> logits (B, num_labels)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.roberta = nn.Module()
        self.roberta.embeddings = nn.Module()
        e = self.roberta.embeddings
        e.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        e.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        e.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        e.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.roberta.encoder = nn.Module()
        self.roberta.encoder.layer = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.classifier.out_proj = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, ids, mask):
        e, mask = self.roberta.embeddings, mask.bool()
        positions = torch.cumsum(mask, 1) * mask + self.config.pad_token_id  # pad + 1, pad + 2, ...; padding: pad
        x = e.word_embeddings(ids) + e.position_embeddings(positions) + e.token_type_embeddings(torch.zeros_like(ids))
        x = e.LayerNorm(x)  # (B, T, C)
        for block in self.roberta.encoder.layer:
            x = block(x, mask)
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(x[:, 0])))  # from <s>, (B, num_labels)


class RobertaReward:
    """r(x, y) of GPT-2 token lists with a RoBERTa classifier: score() -> P(positive), logits() -> the
    log-odds of positive, as float64 numpy (the interface of reward.py's classifiers)."""

    def __init__(self, model, gpt2_to_roberta, bos, eos, pad):
        self.model, self.map, self.bos, self.eos, self.pad = model, gpt2_to_roberta, bos, eos, pad

    def to(self, device):
        self.model.to(device)
        return self

    def ids(self, sequence):
        """<s> + the RoBERTa ids of a GPT-2 token list (end-of-text dropped, cut to the context) + </s>."""
        mapped = self.map[np.asarray(sequence, dtype=np.int64)]
        mapped = mapped[mapped != -2]  # end-of-text
        if (mapped < 0).any():
            token = int(np.asarray(sequence)[self.map[np.asarray(sequence)] == -1][0])
            raise UserError(f"GPT-2 token {token} has no entry in the RoBERTa folder's vocab.json; pass a RoBERTa "
                            f"folder whose vocabulary is GPT-2's BPE (as roberta-base's and roberta-large's are)")
        room = self.model.config.max_position_embeddings - self.model.config.pad_token_id - 3
        return [self.bos, *mapped[:room].tolist(), self.eos]

    @torch.no_grad()
    def logits(self, sequences, batch_size=64):
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(sequences), batch_size):
            rows = [self.ids(s) for s in sequences[i:i + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            with autocast(device.type):
                logits = self.model.eval()(ids, mask).float()
            positive = self.model.config.positive
            out.append((logits[:, positive] - torch.logsumexp(logits[:, torch.arange(logits.shape[1]) != positive], 1)).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def score(self, sequences, batch_size=64):
        return 1 / (1 + np.exp(-self.logits(sequences, batch_size)))  # P(positive) = sigma(log-odds)


# ---------------------------------------------------------------------------- reading a save_pretrained folder
def is_roberta_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "vocab.json"))


def folder_identity(folder):
    """The contents of a classifier folder, as the records of train.py keep them: a digest of each file that
    defines what it computes."""
    files = ("config.json", "vocab.json", "merges.txt", "model.safetensors", "pytorch_model.bin")
    return {name: file_digest(os.path.join(folder, name)) for name in files if os.path.isfile(os.path.join(folder, name))}


def read_json_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not a readable JSON file ({str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def roberta_config(folder):
    hf = read_json_file(os.path.join(folder, "config.json"))
    if hf.get("model_type") != "roberta":
        raise UserError(f"{folder}/config.json is a {hf.get('model_type')!r} model, not a roberta one")
    for field, standard in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if hf.get(field, standard) != standard:
            raise UserError(f"{folder}/config.json: {field} is {hf[field]!r}; this encoder computes only {standard!r}")
    labels = {str(v).lower(): int(k) for k, v in hf.get("id2label", {"0": "negative", "1": "positive"}).items()}
    positive = [i for name, i in labels.items() if name.startswith("pos")]
    if len(positive) != 1:
        raise UserError(f"{folder}/config.json: its labels {sorted(labels)} name no single positive one")
    try:
        return RobertaConfig(**{k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size", "max_position_embeddings")},
                             type_vocab_size=hf.get("type_vocab_size", 1), layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                             pad_token_id=hf.get("pad_token_id", 1), num_labels=len(labels), positive=positive[0])
    except KeyError as e:
        raise UserError(f"{folder}/config.json lacks {e.args[0]}") from None


def read_weights(folder):
    """model.safetensors, or pytorch_model.bin read safely (torch.load(weights_only=True): no code runs)."""
    safetensors, pickled = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.isfile(safetensors):
            return read_safetensors(safetensors)
        if os.path.isfile(pickled):
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{pickled} is not a state dict of tensors")
            return {k: v.float() for k, v in state.items()}
    except ValueError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # a pickle that names code, a truncated file
        raise UserError(f"{pickled} is not a readable weight file ({type(e).__name__}: {str(e)[:150]}); anything that "
                        f"would run code on loading is refused") from None
    raise UserError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")


def load_roberta(folder):
    """A RobertaReward from a save_pretrained RobertaForSequenceClassification folder, every tensor's name,
    shape and dtype checked before any is used; the GPT-2 -> RoBERTa id table from its vocab.json."""
    config = roberta_config(folder)
    if config.num_labels < 2 or config.hidden_size % config.num_attention_heads:
        raise UserError(f"{folder}/config.json: {config.num_labels} labels, {config.hidden_size} wide in "
                        f"{config.num_attention_heads} heads: not a classifier this encoder computes")
    model = RobertaClassifier(config)
    tensors = {k: v for k, v in read_weights(folder).items() if not k.endswith(("position_ids", "token_type_ids"))
               and not k.startswith("roberta.pooler.")}  # buffers, and a pooler the classifier does not use
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or extra:
        raise UserError(f"{folder}: tensor names differ from a RobertaForSequenceClassification of its config.json; "
                        f"missing {missing[:4]}, unexpected {extra[:4]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(ours[name].shape) or not tensor.is_floating_point():
            raise UserError(f"{folder}: {name} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(ours[name].shape)} float")
    model.load_state_dict(tensors)
    return RobertaReward(model.eval().requires_grad_(False), *gpt2_to_roberta(folder, config))


def gpt2_to_roberta(folder, config):
    """(the table GPT-2 id -> RoBERTa id, -1 where vocab.json lacks the token, -2 for end-of-text; <s>, </s>,
    <pad>), with the folder's merges.txt checked to be GPT-2's."""
    vocab = read_json_file(os.path.join(folder, "vocab.json"))
    for special in ("<s>", "</s>", "<pad>"):
        if not isinstance(vocab.get(special), int):
            raise UserError(f"{folder}/vocab.json has no id for {special}")
    if any(not isinstance(i, int) or not 0 <= i < config.vocab_size for i in vocab.values()):
        raise UserError(f"{folder}/vocab.json holds ids outside the model's {config.vocab_size} embeddings")
    enc = get_encoding()
    merges_path = os.path.join(folder, "merges.txt")
    try:
        with open(merges_path, encoding="utf-8") as f:
            theirs = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {merges_path} ({e}); a RoBERTa folder holds its merges.txt beside vocab.json") from None
    if theirs != tokenizer_files(enc)[1].splitlines()[1:]:
        raise UserError(f"{merges_path} is not GPT-2's BPE ({len(theirs)} merges); this reader maps GPT-2's tokens "
                        f"and cannot tokenize with other merges")
    to_text = byte_to_unicode()
    table = np.full(enc.n_vocab, -1, dtype=np.int64)
    for token, rank in enc._mergeable_ranks.items():
        table[rank] = vocab.get("".join(to_text[b] for b in token), -1)
    table[enc.eot_token] = -2
    return table, vocab["<s>"], vocab["</s>"], vocab["<pad>"]
