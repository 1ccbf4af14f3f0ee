"""
A trained policy out to the Hugging Face ecosystem, with no other library: a folder that
`transformers` loads as GPT-2,

    AutoModelForCausalLM.from_pretrained(DIR), AutoTokenizer.from_pretrained(DIR)

holding model.safetensors (written by hand: pretrained.write_safetensors), config.json, and GPT-2's
tokenizer files, vocab.json and merges.txt, rebuilt from tiktoken's r50k_base ranks (data.tokenizer_files).
A model whose head scores only some tokens (--output-vocab) gets an untied head of its own that gives
every other token a logit of -10,000 (probability 0), exactly: see unscored_row.

    python export.py                                        # out/dpo_beta0.1/dpo.pt (python train.py's DPO) -> hf/
    python export.py --ckpt out/sft.pt --out hf/sft         # any policy checkpoint: sft, dpo, ppo, sppo
"""
import json
import os
from dataclasses import dataclass, field

import torch

from checkpoint import atomic_write, load_model
from cli import UserError, parse_config, run_main
from data import EOT, get_encoding, tokenizer_files
from pretrained import CONV1D, write_safetensors


@dataclass
class ExportConfig:
    ckpt: str = field(default="out/dpo_beta0.1/dpo.pt", metadata={"help": "policy checkpoint (sft, dpo, ppo or sppo)"})
    out: str = field(default="hf", metadata={"help": "folder to write the Hugging Face GPT-2 into"})

    def validate(self):
        pass


UNSCORED_LOGIT = -1e4  # exp(-10,000) is 0 in every float format: a token the model never emits stays so


def unscored_row(model, ckpt):
    """A head row whose logit is UNSCORED_LOGIT whatever the input. The final LayerNorm gives
    h = g * z + b with z of mean 0 across the C features, so the row w = 1 / g has
    w . h = sum(z) + sum(b / g) = sum(b / g), a constant c; UNSCORED_LOGIT / c * w gives the logit."""
    g, b = model.transformer.ln_f.weight.double(), model.transformer.ln_f.bias.double()
    w = 1 / g
    c = (b * w).sum()
    # float32 rounding moves w . h by about 1e-7 * (C + sum |b / g|), scaled by UNSCORED_LOGIT / c: keep it under 10%
    if not (torch.isfinite(w).all() and abs(c) > 1e-5 * (len(g) + (b * w).abs().sum())):
        raise UserError(f"{ckpt}: its final LayerNorm gives no row of constant logit (a weight near 0, or sum(bias / weight) "
                        f"near 0), so the tokens its head does not score cannot be ruled out in GPT-2's form")
    return (UNSCORED_LOGIT / c * w).float()


def gpt2_tensors(model, ckpt="the model"):
    """Our GPT's weights under Hugging Face's GPT2LMHeadModel names, Conv1D weights transposed back to
    (in, out). The LM head is tied to wte, so, as in HF's own files, it is not stored; a head scoring
    only output_ids is stored: their wte rows, and unscored_row for every other token."""
    tensors = {name: (tensor.t() if name.endswith(CONV1D) else tensor).float().contiguous()
               for name, tensor in model.state_dict().items() if name not in ("lm_head.weight", "output_ids")}
    if model.output_ids is not None:
        head = unscored_row(model, ckpt).expand(model.config.vocab_size, -1).clone()
        head[model.output_ids] = tensors["transformer.wte.weight"][model.output_ids]
        tensors["lm_head.weight"] = head
    return tensors


def gpt2_config(config):
    """config.json of a GPT2LMHeadModel that computes what model.py's GPT computes: tanh GELU, LayerNorm
    eps 1e-5, scores / sqrt(head_dim), a head tied to wte (a head of its own with output_vocab), no dropout."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": not config.output_vocab, "bos_token_id": EOT, "eos_token_id": EOT, "torch_dtype": "float32"}


def export(ckpt, out):
    """Write the folder; returns the files written."""
    model = load_model(ckpt)
    vocab, merges = tokenizer_files(get_encoding())
    config = gpt2_config(model.config)
    special = "<|endoftext|>"
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size,
                        "bos_token": special, "eos_token": special, "unk_token": special, "add_prefix_space": False}
    files = {"config.json": config, "vocab.json": vocab, "tokenizer_config.json": tokenizer_config,
             "special_tokens_map.json": {"bos_token": special, "eos_token": special, "unk_token": special},
             "generation_config.json": {"bos_token_id": EOT, "eos_token_id": EOT}}
    os.makedirs(out, exist_ok=True)
    tensors = gpt2_tensors(model, ckpt)
    atomic_write(os.path.join(out, "model.safetensors"), lambda f: write_safetensors(f, tensors, {"format": "pt"}))
    for name, value in files.items():
        atomic_write(os.path.join(out, name), lambda f: f.write(json.dumps(value, indent=1, ensure_ascii=False).encode()))
    atomic_write(os.path.join(out, "merges.txt"), lambda f: f.write(merges.encode()))
    return ["model.safetensors", *files, "merges.txt"]


def main():
    cfg = parse_config(ExportConfig, description=__doc__)  # an --out that is a file is refused there
    files = export(cfg.ckpt, cfg.out)
    print(f"wrote {', '.join(files)} to {cfg.out}\n"
          f"load it: AutoModelForCausalLM.from_pretrained({cfg.out!r}), AutoTokenizer.from_pretrained({cfg.out!r})")


if __name__ == "__main__":
    run_main(main)
