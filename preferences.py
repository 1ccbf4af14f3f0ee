"""
Preference files as people have them, read into token ids: (prompt, chosen, rejected) triples.

Accepted, one JSON object a line (JSONL) or a JSON array of such objects:
  explicit        {"prompt": "The movie was", "chosen": " great.", "rejected": " dull."}
                  (optional "prompt_ids", "chosen_ids", "rejected_ids": exact GPT-2 token ids, which win)
  implicit prompt {"chosen": "...", "rejected": "..."}: the prompt is their longest shared start, cut at
                  a token boundary (Anthropic HH-RLHF's "\n\nHuman: ... \n\nAssistant:" rows are such)
  conversational  TRL's rows, each text a list of {"role", "content"} messages, with or without "prompt":
                  flattened by the template below, then read as one of the two rows above.
The conversational template: each message is "\n\n" + its speaker + ": " + its content, the speaker
being Human for "user", Assistant for "assistant", System for "system" (HH-RLHF's own layout).
"""
import json
from dataclasses import dataclass

from cli import UserError
from data import EOT, get_encoding
from device import print0

FORMATS = ("one JSON object a line (or a JSON array of them) with prompt, chosen and rejected texts; chosen and "
           "rejected alone (the prompt is their shared start, as in HH-RLHF); or TRL's conversational rows "
           "(lists of {\"role\", \"content\"} messages)")
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


@dataclass
class PreferencePair:
    prompt: list  # token ids
    chosen: list
    rejected: list


def read_pairs(path, max_length, skip_bad=False):
    """The pairs of a preference file (the formats above). Prompt and responses are tokenized
    separately and concatenated, so no BPE merge crosses the boundary. A bad row stops with FILE:LINE
    (or FILE: item N of an array) and the problem, or, with skip_bad, is skipped and counted."""
    try:
        with open(path, "rb") as f:  # bytes: each line is decoded on its own, so a bad byte is a bad line
            data = f.read()
    except OSError as e:  # missing, a folder, no permission
        raise UserError(f"cannot read the preference file {path} ({e.strerror}); pass --pairs PATH of {FORMATS}") from None
    if data.startswith(b"PAR1"):
        raise UserError(f"{path} is a Parquet file, which this project does not read (it would need pyarrow); convert it "
                        f"to JSONL, e.g. python -c \"import pandas as pd; pd.read_parquet('{path}').to_json('pairs.jsonl', "
                        f"orient='records', lines=True)\", and pass that")
    enc = get_encoding()
    pairs, skipped = [], []
    for where, row in rows_of(path, data, max_length):
        try:
            pairs.append(parse_pair(row, enc, max_length))
        except ValueError as e:
            if not skip_bad:
                raise UserError(f"{path}{where}: {e} (pass --skip-bad-lines to skip such rows; accepted: {FORMATS})") from None
            skipped.append(where)
    if skipped:
        print0(f"skipped {len(skipped)} bad rows of {path} (first: {''.join(skipped[:10])})")
    if not pairs:
        raise UserError(f"{path} holds no usable preference pairs; accepted: {FORMATS}")
    return pairs


def rows_of(path, data, max_length):
    """(":LINE" or ": item N", the parsed row, or the exception its line raised when parsed) of a JSONL
    file or a JSON array. A line far longer than a prompt and two responses of max_length tokens is
    refused by its size, before any time goes into parsing or tokenizing it."""
    limit = max(1 << 20, 3 * 64 * max_length)  # 64 bytes a token for each of prompt, chosen and rejected, or 1 MiB
    if data.lstrip()[:1] == b"[":  # a JSON array of rows
        try:
            array = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{path} starts like a JSON array but is not one ({str(e)[:100]}); accepted: {FORMATS}") from None
        for number, row in enumerate(array, 1):  # text that starts with "[" parses only to a list
            yield f": item {number}", row
        return
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(line) > limit:
            yield f":{number}", ValueError(f"the line is {len(line):,} bytes, more than {limit:,}: far longer than a "
                                           f"prompt and two responses of at most {max_length} tokens each")
            continue
        try:
            yield f":{number}", json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield f":{number}", ValueError(f"not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1}); "
                                           f"save the file as UTF-8")
        except (json.JSONDecodeError, RecursionError) as e:
            yield f":{number}", ValueError(f"malformed JSON ({getattr(e, 'msg', 'nested too deeply')})")


def parse_pair(row, enc, max_length):
    """One row (a dict, or the error its line raised) -> PreferencePair; ValueError saying what is wrong."""
    if isinstance(row, ValueError):
        raise row
    if not isinstance(row, dict):
        raise ValueError("each row must be a JSON object with prompt, chosen and rejected")
    texts = {key: flatten(row[key], key) if isinstance(row.get(key), list) and f"{key}_ids" not in row else row.get(key)
             for key in ("prompt", "chosen", "rejected")}
    parts = {}
    for key in ("prompt", "chosen", "rejected"):
        if f"{key}_ids" in row:
            ids = row[f"{key}_ids"]
            if not (isinstance(ids, list) and all(type(i) is int and 0 <= i <= EOT for i in ids)):
                raise ValueError(f"'{key}_ids' must be a list of token ids in [0, {EOT}]")
        elif texts[key] is not None:
            if not isinstance(texts[key], str):
                raise ValueError(f"'{key}' must be a string or a list of messages")
            ids = enc.encode_ordinary(texts[key])
        elif key == "prompt":
            continue  # an implicit prompt: the shared start of chosen and rejected, below
        else:
            raise ValueError(f"missing key '{key}'")
        if not ids:
            raise ValueError(f"'{key}' is empty")
        parts[key] = ids
    if "prompt" not in parts:
        parts["prompt"], parts["chosen"], parts["rejected"] = split_shared_start(parts["chosen"], parts["rejected"])
    if parts["chosen"] == parts["rejected"]:
        raise ValueError("chosen and rejected are the same response")
    if len(parts["prompt"]) + 2 > max_length:  # room for at least one response token and end-of-text
        raise ValueError(f"the prompt has {len(parts['prompt'])} tokens; with a response it exceeds the "
                         f"maximum length of {max_length} (raise --max-length up to the model's context)")
    return PreferencePair(parts["prompt"], parts["chosen"], parts["rejected"])


def split_shared_start(chosen, rejected):
    """An implicit prompt: (the longest shared start of two token lists, the rest of each). The texts
    were tokenized whole, so the cut falls on a token boundary even where the shared text ends mid-word
    ("Assistant: Sure" / "Assistant: Surely": the prompt ends at "Assistant:")."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("missing key 'prompt', and chosen and rejected share no opening tokens to take as the prompt")
    if n == len(chosen) or n == len(rejected):
        raise ValueError("missing key 'prompt', and one of chosen and rejected is the other's start: no response is left")
    return chosen[:n], chosen[n:], rejected[n:]


def flatten(messages, key):
    """A conversation (a list of {"role", "content"} messages) as text, by the template of the docstring."""
    text = ""
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise ValueError(f"'{key}' is a list, but not of {{\"role\": str, \"content\": str}} messages")
        text += f"\n\n{SPEAKERS.get(message['role'], message['role'].capitalize())}: {message['content']}"
    return text
