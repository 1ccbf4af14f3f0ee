"""export.py: a policy checkpoint out as a Hugging Face GPT-2 folder. The weights are read back by
the project's own HF-folder reader (and compared with a float64 forward pass of the raw tensors); the
tokenizer files are turned back into BPE ranks and a BPE written here from merges.txt alone."""
import json

import numpy as np
import pytest
import regex
import torch

import data
import export
from conftest import save_tiny_checkpoint, tiny_gpt
from data import get_encoding
from pretrained import load_gpt2, read_safetensors
from test_pretrained import CONV1D, gpt2_tensors, reference_gpt2_logits, save_pretrained


def test_export_writes_the_gpt2_tensors_it_was_loaded_from_and_the_same_logits(tmp_path):
    """HF folder -> our GPT -> our checkpoint -> export: the same tensor names, shapes and (Conv1D,
    transposed) layouts as the folder it came from, and logits equal to a float64 forward of them."""
    tensors = gpt2_tensors(seed=3)
    model = load_gpt2(save_pretrained(tmp_path / "hf_in", tensors))
    ckpt = save_tiny_checkpoint(tmp_path / "dpo.pt", model, kind="dpo")
    export.export(ckpt, str(tmp_path / "hf_out"))
    written = read_safetensors(str(tmp_path / "hf_out" / "model.safetensors"))
    assert set(written) == {"transformer." + name for name in tensors}  # the tied head is not stored, as in HF's files
    for name, array in tensors.items():
        assert tuple(written["transformer." + name].shape) == array.shape
        np.testing.assert_array_equal(written["transformer." + name].numpy(), array)
    config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (2, 4, 32, 16)
    idx = [3, 17, 0, 42, 8, 8, 1]
    reloaded = load_gpt2(str(tmp_path / "hf_out"))  # config.json gives the head count (8-wide heads, not 64)
    with torch.no_grad():
        logits = reloaded(torch.tensor([idx]))[0].double().numpy()
    np.testing.assert_allclose(logits, reference_gpt2_logits(tensors, idx), atol=1e-5)


@pytest.mark.parametrize("kind", ["sft", "dpo", "ppo", "sppo"])
def test_every_policy_checkpoint_exports_and_reloads_with_equal_logits(tmp_path, kind):
    model = tiny_gpt(seed=1)
    ckpt = save_tiny_checkpoint(tmp_path / f"{kind}.pt", model, kind=kind)
    export.export(ckpt, str(tmp_path / "hf"))
    x = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load_gpt2(str(tmp_path / "hf"))(x), model(x), atol=1e-5, rtol=0)


def test_a_head_scoring_some_tokens_exports_their_logits_and_minus_10000_for_every_other(tmp_path):
    """A restricted head (--output-vocab) has no tied GPT-2 form: the export's own head gives the scored
    tokens their logits and every other token -10,000 whatever the input, in a float64 forward of the
    written tensors; its softmax over all tokens is the model's over its own."""
    import dataclasses
    from model import GPT
    model = load_gpt2(save_pretrained(tmp_path / "hf_in", gpt2_tensors(seed=4)))
    output_ids = [0, 3, 8, 17, 23, 42, 49]
    restricted = GPT(dataclasses.replace(model.config, output_vocab=len(output_ids))).eval()
    restricted.load_state_dict({**model.state_dict(), "output_ids": torch.tensor(output_ids)})
    export.export(save_tiny_checkpoint(tmp_path / "dpo.pt", restricted, kind="dpo"), str(tmp_path / "hf_out"))
    assert json.loads((tmp_path / "hf_out" / "config.json").read_text())["tie_word_embeddings"] is False
    written = {k: v.numpy() for k, v in read_safetensors(str(tmp_path / "hf_out" / "model.safetensors")).items()}
    head = written.pop("lm_head.weight")
    assert head.shape == (50, 32) and "output_ids" not in written
    for idx in ([3, 17, 0, 42, 8, 8, 1], [5, 5, 49, 2]):
        logits = reference_gpt2_logits({k.removeprefix("transformer."): v for k, v in written.items()}, idx, lm_head=head)
        with torch.no_grad():
            ours = restricted(torch.tensor([idx]))[0].double().numpy()
        np.testing.assert_allclose(logits[:, output_ids], ours, atol=1e-5)
        unscored = np.delete(logits, output_ids, axis=1)
        np.testing.assert_allclose(unscored, -1e4, rtol=1e-3)
        full_softmax = np.exp(logits - logits.max(-1, keepdims=True))
        full_softmax /= full_softmax.sum(-1, keepdims=True)
        np.testing.assert_allclose(full_softmax[:, output_ids], torch.tensor(ours).softmax(-1).numpy(), atol=1e-6)


def test_conv1d_weights_are_written_transposed(tmp_path):
    model = tiny_gpt()
    written = export.gpt2_tensors(model)
    for name, param in model.state_dict().items():
        if name.endswith(CONV1D):
            assert torch.equal(written[name], param.t())


def bytes_of(text, to_byte):
    return bytes(to_byte[c] for c in text)


def test_tokenizer_files_give_tiktokens_ranks_back(tmp_path):
    """vocab.json, read through GPT-2's byte <-> unicode table, is r50k_base's ranks and <|endoftext|>."""
    enc = get_encoding()
    vocab, merges = data.tokenizer_files(enc)
    to_byte = {c: b for b, c in data.byte_to_unicode().items()}
    assert len(to_byte) == 256 and all(c.isprintable() and not c.isspace() for c in to_byte)
    ranks = {bytes_of(text, to_byte): i for text, i in vocab.items() if text != "<|endoftext|>"}
    assert ranks == enc._mergeable_ranks and vocab["<|endoftext|>"] == 50256
    lines = merges.splitlines()
    assert lines[0].startswith("#version") and len(lines) - 1 == len(ranks) - 256  # one merge per multi-byte token


def hf_bpe(piece, merge_rank, vocab, to_text):
    """BPE as GPT-2's original encoder.py runs it, from merges.txt's order alone: merge the adjacent pair
    of the lowest merge rank until none is left, then look each part up in vocab.json."""
    parts = [to_text[b] for b in piece.encode()]
    while len(parts) > 1:
        pairs = [(merge_rank.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [vocab[p] for p in parts]


def test_merges_and_vocab_alone_tokenize_text_as_tiktoken_does():
    enc = get_encoding()
    vocab, merges = data.tokenizer_files(enc)
    merge_rank = {tuple(line.split(" ")): i for i, line in enumerate(merges.splitlines()[1:])}
    to_text = data.byte_to_unicode()
    text = ("This movie was unbelievably good -- I'd watch it again!\n\nThe 1999 remake? Meh. "
            "Ça ne marche pas… 日本語のテキスト, tabs\tand   spaces, émojis 🎬🍿 and <br /> tags.")
    ours = [t for piece in regex.findall(enc._pat_str, text) for t in hf_bpe(piece, merge_rank, vocab, to_text)]
    assert ours == enc.encode_ordinary(text)


def test_a_token_that_no_two_lower_tokens_make_is_refused():
    with pytest.raises(ValueError, match="is not a merge of two tokens of lower rank"):
        data.bpe_parts(b"abc", {b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_a_gpt2_folder_is_read_wherever_a_checkpoint_is(tmp_path):
    """An exported (save_pretrained-style) folder as DPO's --sft (policy and reference) and sample.py's
    --ckpt: DPO from it takes the same steps as DPO from the checkpoint it was exported from."""
    from test_dpo import TEXT_PAIRS, logged_losses, trainer_config
    from checkpoint import load_model, write_jsonl
    import dpo
    ckpt = save_tiny_checkpoint(tmp_path / "sft.pt", tiny_gpt(seed=3))
    export.export(ckpt, str(tmp_path / "hf"))
    pairs = str(tmp_path / "pairs.jsonl")
    write_jsonl(pairs, TEXT_PAIRS)
    for sft, out in ((ckpt, "from_ckpt"), (str(tmp_path / "hf"), "from_hf")):
        dpo.train_dpo(trainer_config(sft, pairs, str(tmp_path / out), steps=3))
    a, b = logged_losses(str(tmp_path / "from_ckpt")), logged_losses(str(tmp_path / "from_hf"))
    assert len(a) == 3 and [s for s, _ in a] == [s for s, _ in b]
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], abs=1e-6)
    x = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(load_model(str(tmp_path / "hf"))(x), load_model(ckpt)(x), atol=1e-5, rtol=0)


def test_a_missing_path_names_every_kind_of_model_it_could_have_been(tmp_path):
    from checkpoint import load_model
    from cli import UserError
    with pytest.raises(UserError, match=r"checkpoint not found: .*nothing; pass one of this project's checkpoints \(\.pt\), "
                                        r"a save_pretrained GPT-2 folder, a \.safetensors file or a published GPT-2 name"):
        load_model(str(tmp_path / "nothing"))
