"""Preference files as people have them: each accepted format gives the token ids of the equivalent
explicit row, computed here by tokenizing the texts written out by hand; bad rows are one-line errors."""
import json

import pytest

from checkpoint import write_jsonl
from cli import UserError
from data import get_encoding
from preferences import read_pairs

HUMAN = "\n\nHuman: Was the film any good?"
EXPLICIT = {"prompt": HUMAN + "\n\nAssistant:", "chosen": " Sure, it was great fun.", "rejected": " Surely not, it bored me."}


def ids(row):
    """The token ids of an explicit row, tokenized piece by piece, by hand."""
    enc = get_encoding()
    return tuple(enc.encode_ordinary(row[key]) for key in ("prompt", "chosen", "rejected"))


def read_one(tmp_path, row):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [row])
    (pair,) = read_pairs(str(path), max_length=128)
    return pair.prompt, pair.chosen, pair.rejected


def test_hh_rows_take_their_shared_start_as_the_prompt_cut_at_a_token_boundary(tmp_path):
    """The shared text ends mid-word ("Assistant: Sure" / "Assistant: Surely"): the prompt ends before it."""
    hh = {"chosen": EXPLICIT["prompt"] + EXPLICIT["chosen"], "rejected": EXPLICIT["prompt"] + EXPLICIT["rejected"]}
    assert hh["chosen"].startswith(HUMAN + "\n\nAssistant: Sure") and hh["rejected"].startswith(HUMAN + "\n\nAssistant: Sure")
    assert read_one(tmp_path, hh) == ids(EXPLICIT)


def test_conversational_rows_are_flattened_by_the_documented_template(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Was the film any good?"}]
    chosen, rejected = [{"role": "assistant", "content": "Yes, great fun."}], [{"role": "assistant", "content": "No."}]
    flat_prompt = "\n\nSystem: Be brief.\n\nHuman: Was the film any good?"  # the template, written out
    expected = ids({"prompt": flat_prompt, "chosen": "\n\nAssistant: Yes, great fun.", "rejected": "\n\nAssistant: No."})
    assert read_one(tmp_path, {"prompt": messages, "chosen": chosen, "rejected": rejected}) == expected
    implicit = read_one(tmp_path, {"chosen": messages + chosen, "rejected": messages + rejected})  # TRL's implicit prompt
    enc = get_encoding()
    assert implicit[0] + implicit[1] == enc.encode_ordinary(flat_prompt + "\n\nAssistant: Yes, great fun.")
    assert enc.decode(implicit[0]).startswith(flat_prompt) and implicit[1] != implicit[2]


def test_a_json_array_reads_as_the_same_rows_in_jsonl(tmp_path):
    rows = [EXPLICIT, {"chosen": "The plot was good", "rejected": "The plot was bad"}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    as_array = [(p.prompt, p.chosen, p.rejected) for p in read_pairs(str(tmp_path / "pairs.json"), 128)]
    assert as_array == [(p.prompt, p.chosen, p.rejected) for p in read_pairs(str(tmp_path / "pairs.jsonl"), 128)]
    assert as_array[0] == ids(EXPLICIT)


@pytest.mark.parametrize("row, says", [
    ({"chosen": "A fine film", "rejected": "Dull"}, "share no opening tokens to take as the prompt"),
    ({"chosen": "The film was good", "rejected": "The film was good and long"}, "is the other's start"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'prompt' is a list, but not of"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "'chosen' must be a string or a list of messages"),
])
def test_a_bad_row_of_each_format_is_one_line_naming_file_line_and_the_formats(tmp_path, row, says):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [EXPLICIT, row])
    with pytest.raises(UserError) as info:
        read_pairs(str(path), 128)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and says in message and "HH-RLHF" in message and "\n" not in message


def test_a_bad_item_of_an_array_is_named_by_its_number(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps([EXPLICIT, ["not", "an", "object"]]))
    with pytest.raises(UserError, match=r"pairs.json: item 2: each row must be a JSON object"):
        read_pairs(str(tmp_path / "pairs.json"), 128)


def test_parquet_is_refused_with_how_to_convert_it(tmp_path):
    (tmp_path / "pairs.parquet").write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    with pytest.raises(UserError, match=r"is a Parquet file, .* convert it to JSONL, e.g. python -c .*read_parquet"):
        read_pairs(str(tmp_path / "pairs.parquet"), 128)
