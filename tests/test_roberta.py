"""The RoBERTa classifier read without transformers, against a tiny RobertaForSequenceClassification
that transformers made (tests/fixtures/make_roberta_fixture.py) and the logits it computed; the GPT-2 ->
RoBERTa id mapping; refused folders; and a smoke run of Figure 2 with it as the ground truth."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import atomic_write
from cli import UserError
from data import EOT, get_encoding, tokenizer_files
from roberta import RobertaClassifier, load_roberta, roberta_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "roberta_tiny")
CASES = json.load(open(os.path.join(FIXTURE, "cases.json")))
SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


def tiny_folder(path, vocab=None, merges=None):
    """The fixture with a vocab.json (default: GPT-2 token of rank r -> id 4 + r % 60, so ids 4..63 are the
    ranks 0..59) and GPT-2's merges.txt."""
    shutil.copytree(FIXTURE, path)
    enc = get_encoding()
    gpt2_vocab, gpt2_merges = tokenizer_files(enc)
    if vocab is None:
        vocab = {**SPECIAL, **{text: 4 + rank % 60 for text, rank in gpt2_vocab.items() if rank != EOT}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text(merges if merges is not None else gpt2_merges)
    return str(path)


def test_logits_equal_transformers_with_padding_mixed_lengths_and_the_whole_context():
    model = RobertaClassifier(roberta_config(FIXTURE))
    from pretrained import read_safetensors
    model.load_state_dict(read_safetensors(os.path.join(FIXTURE, "model.safetensors")))
    with torch.no_grad():
        logits = model.eval()(torch.tensor(CASES["input_ids"]), torch.tensor(CASES["attention_mask"]))
    np.testing.assert_allclose(logits.numpy(), np.array(CASES["logits"]), atol=1e-5, rtol=0)


def test_gpt2_token_lists_score_as_their_roberta_ids_do(tmp_path):
    """GPT-2 rank r is RoBERTa id 4 + r here: each fixture row, as GPT-2 tokens, gives transformers' log-odds."""
    reward = load_roberta(tiny_folder(tmp_path / "folder"))
    rows = [[i - 4 for i, m in zip(ids, mask) if m][1:-1] for ids, mask in zip(CASES["input_ids"], CASES["attention_mask"])]
    expected = [positive - negative for negative, positive in CASES["logits"]]
    np.testing.assert_allclose(reward.logits(rows, batch_size=3), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(reward.score(rows), 1 / (1 + np.exp(-np.array(expected))), atol=1e-6)


def test_the_id_mapping_wraps_drops_end_of_text_cuts_to_the_context_and_names_a_missing_token(tmp_path):
    enc = get_encoding()
    vocab = {**SPECIAL, "This": 10, "Ġmovie": 11, "Ġwas": 12, "Ġgreat": 13}  # vocab.json's strings of GPT-2 tokens
    reward = load_roberta(tiny_folder(tmp_path / "folder", vocab=vocab))
    tokens = enc.encode_ordinary("This movie was great")
    assert reward.ids(tokens) == [0, 10, 11, 12, 13, 2]
    assert reward.ids(tokens + [EOT] + tokens) == [0, 10, 11, 12, 13, 10, 11, 12, 13, 2]  # end-of-text dropped
    long = tokens * 10  # 40 tokens: 24 positions, from pad + 1 = 2, hold <s> + 20 + </s>
    assert reward.ids(long) == [0] + [10, 11, 12, 13] * 5 + [2]
    missing = enc.encode_ordinary(" terrible")[0]
    with pytest.raises(UserError, match=f"GPT-2 token {missing} has no entry in the RoBERTa folder's vocab.json"):
        reward.score([tokens + [missing]])


def break_weights(folder, change):
    from pretrained import read_safetensors, write_safetensors
    tensors = read_safetensors(os.path.join(folder, "model.safetensors"))
    change(tensors)  # the tensors map the file: write a new one and rename it over, as every writer here does
    atomic_write(os.path.join(folder, "model.safetensors"), lambda f: write_safetensors(f, tensors))


@pytest.mark.parametrize("damage, says", [
    (lambda folder: break_weights(folder, lambda t: t.pop("classifier.out_proj.weight")), "missing ['classifier.out_proj.weight']"),
    (lambda folder: break_weights(folder, lambda t: t.update({"classifier.dense.weight": torch.zeros(16, 8)})),
     "classifier.dense.weight is (16, 8) torch.float32, expected (16, 16) float"),
    (lambda folder: open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\nĠ t\n"), "is not GPT-2's BPE"),
    (lambda folder: open(os.path.join(folder, "config.json"), "w").write("[1, 2]"), "holds a JSON list, not an object"),
])
def test_a_lying_or_mismatched_folder_is_a_one_line_error(tmp_path, damage, says):
    folder = tiny_folder(tmp_path / "folder")
    damage(folder)
    with pytest.raises(UserError) as info:
        load_roberta(folder)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "folder")
    os.remove(os.path.join(folder, "model.safetensors"))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    torch.save({"payload": Exploit()}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(UserError, match="anything that would run code on loading is refused"):
        load_roberta(folder)
    assert not os.path.exists("pwned")


def test_figure2_smoke_run_with_the_fixture_as_ground_truth(tmp_path, tiny_imdb):
    """Every method of Figure 2 with the RoBERTa folder as r(x, y): the pairs, PPO-GT and the evaluations
    use it; the report says so; the settings record it, so another scorer redoes the pairs and not SFT."""
    folder, out = tiny_folder(tmp_path / "roberta"), tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "smoke", "--data", tiny_imdb, "--no-data-verify",
            "--device", "cpu", "--out", str(out), "--sft-steps", "4", "--reward-steps", "4", "--judge-steps", "4",
            "--dpo-steps", "2", "--pft-steps", "2", "--betas", "0.1", "--dpo-eval-interval", "2"]
    result = subprocess.run(args + ["--ground-truth", folder], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert {r["method"] for r in rows} == {"SFT", "Preferred-FT", "DPO", "Unlikelihood", "PPO", "PPO-GT", "Best-of-N"}
    reward = load_roberta(folder)
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    scores = reward.score([p["prompt_ids"] + p["chosen_ids"] for p in pairs[:6]])
    np.testing.assert_allclose([p["chosen_reward"] for p in pairs[:6]], scores, atol=1e-6)  # labelled by RoBERTa
    assert f"ground truth r(x, y): the RoBERTa classifier {folder}" in (out / "report.md").read_text()
    shutil.rmtree(tmp_path / "roberta")  # another scorer at the same path: the pairs and after are redone
    folder = tiny_folder(tmp_path / "roberta", vocab={**SPECIAL, **{t: 4 + (r * 7) % 60 for t, r in tokenizer_files(
        get_encoding())[0].items() if r != EOT}})
    result = subprocess.run(args + ["--ground-truth", folder, "--methods", "sft_point"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=== sft: done already" in result.stdout and "=== reward: done already" in result.stdout
    assert "pairs was made with other settings (ground_truth" in result.stdout
