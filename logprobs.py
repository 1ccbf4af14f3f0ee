"""
Log-probabilities under a language model, the quantity every objective here is written in:
log pi(y_t | x, y_<t) for each token of a response y after a prompt x, and their sum
log pi(y | x) for the whole response. DPO, its family, PPO, SPPO and the evaluation all take them
from here, on one of two row layouts:
  right-padded rows prompt + response + padding (the preference trainers': dpo.collate), where
  causal attention keeps the padding after a row's tokens out of its log-probs;
  left-padded rows padding + prompt + completion (sampled completions: prompt_completion_rows),
  with an attention mask, so that every completion ends its row.
A model whose head scores only some tokens (model.output_ids) gives logits over those: the targets
are looked up as its logit rows (model.output_rows) before the gather.
"""
import math

import torch
import torch.nn.functional as F

from model import left_pad


def target_logps(logits, targets):
    """log softmax(logits)[target] along the last axis: logits (..., V), targets (...) logit rows -> (...),
    in float32 or better (bf16 -> float32; float64 stays float64). A target -1 (a token the head does not
    score, model.output_rows) has probability 0: log-prob -inf."""
    # log_softmax(z)[y] = z[y] - logsumexp(z): one float32 (..., V) temporary, not two
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scored = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).to(dtype)
    return (scored - torch.logsumexp(logits.to(dtype), dim=-1)).masked_fill(targets < 0, -math.inf)


def token_logps(logits, tokens):
    """log pi(tokens[t] | tokens[<t]) for t = 1..T-1: (B, T-1). logits (B, T, V) with logits[:, t]
    predicting tokens[:, t + 1]."""
    return target_logps(logits[:, :-1], tokens[:, 1:])  # position t-1 predicts token t


def sequence_logps(token_logps, mask, average=False):
    """log pi(y|x) = sum over the response tokens t of log pi(y_t | x, y_<t), (B,); with average, the
    mean (1/|y|) log pi(y|x) over them instead (SimPO's reward, ORPO's likelihood). token_logps and
    mask (B, T-1), as token_logps and response_mask[:, 1:] give them (token 0 is never predicted)."""
    logps = torch.where(mask, token_logps, 0.0).sum(-1)
    return logps / mask.sum(-1) if average else logps


def response_token_logps(model, tokens, response_mask, attention_mask=None):
    """log pi(y_t | x, y_<t) at each response token, 0 elsewhere: (B, T-1), the values of
    torch.where(response_mask[:, 1:], token_logps(model(tokens, attention_mask), tokens), 0.0), with
    the LM head run only at the positions that predict a response token (a quarter of a DPO row's are
    prompt or padding). attention_mask (B, T): for left-padded rows; right-padded rows need none."""
    mask = response_mask[:, 1:].bool()  # token 0 has no prediction; it is always prompt
    predicting = F.pad(mask, (0, 1))  # position t predicts token t + 1
    rows = getattr(model, "module", model).output_rows(tokens[:, 1:][mask])  # DDP keeps the GPT in .module
    logps = target_logps(model(tokens, attention_mask, positions=predicting), rows)  # (N,), row-major
    return torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)


def prompt_completion_rows(prompts, completions, device):
    """Rows prompt + completion, left-padded: ids and attention mask (B, T), and the response mask
    (B, T) marking each completion's tokens, which end every row."""
    ids, mask = left_pad([p + c for p, c in zip(prompts, completions)], device=device)
    response_mask = torch.zeros_like(mask)
    for row, c in enumerate(completions):
        response_mask[row, ids.shape[1] - len(c):] = 1
    return ids, mask, response_mask


def completion_token_logps(model, ids, mask, length):
    """log pi(y_t | x, y_<t) of the last `length` tokens of each left-padded row (completions of equal
    length, as PPO and SPPO sample them): (B, length). Only the positions that predict them go
    through the LM head, the bulk of a small model's compute."""
    logits = model.head(model.hidden_states(ids, mask)[:, -length - 1:])  # (B, length + 1, V)
    return token_logps(logits, model.output_rows(ids[:, -length - 1:]))
