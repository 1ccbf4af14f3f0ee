"""
GPT-2's weights for model.py's GPT, with no other library: the published checkpoints ("gpt2" ...
"gpt2-xl", fetched once from the Hugging Face hub as safetensors), a folder written by Hugging Face's
`save_pretrained` (model.safetensors with its config.json), or a bare .safetensors file.

`load_gpt2(name_or_path)` reads the safetensors format by hand (`read_safetensors`), takes every size
but the head count from the tensor shapes and the head count from config.json (or the published
sizes), refuses a config whose GPT-2 computes something our GPT does not, and copies the tensors in
by name, transposing GPT-2's Conv1D weights.
"""
import json
import math
import mmap
import os
import struct

import torch

from download import download
from model import GPT, GPTConfig


def load_gpt2(name_or_path, dropout=0.0):
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
    model = GPT(GPTConfig(**gpt2_sizes(path, tensors), dropout=dropout))
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if set(ours) != set(tensors):
        missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
        raise ValueError(f"{path}: tensor names differ from GPT-2's; missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, param in ours.items():
            src = tensors[name]
            if name.endswith(CONV1D):  # GPT-2 stores these as Conv1D (in, out); nn.Linear wants (out, in)
                src = src.t()
            if src.shape != param.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, expected {tuple(param.shape)}")
            param.copy_(src)
    return model


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)

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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{config_path} is not a JSON config ({str(e)[:80]})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path} holds a JSON {type(hf).__name__}, not a config object; put the model's "
                         f"config.json (from save_pretrained) beside it")
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
    checked before any tensor is read: a damaged file raises ValueError instead of loading wrong bytes.
    The file is mapped, not read: each float32 tensor is a view of its pages (copy on write), which are
    read when the weights are copied into a model, so loading gpt2-xl takes about one copy of its weights.
    Copy them before the file could change: every writer here writes a new file and renames it over."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is not a safetensors file (only {len(head)} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"{path} is not a safetensors file or is truncated (header length {header_len} exceeds "
                                 f"the file's {size} bytes); download or save it again")
            raw_header = f.read(header_len)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror}); pass a .safetensors file") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a safetensors file (bad header: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, "
                         f"not an object); pass a .safetensors file")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in entries.items():
        check_safetensors_entry(path, name, info, data_len)
    spans = sorted((*info["data_offsets"], name) for name, info in entries.items())
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:  # else one tensor's bytes would load as another's
            raise ValueError(f"{path}: tensors {name} and {other} share bytes (their data_offsets overlap); "
                             f"the file is damaged: download or save it again")
    tensors = {}
    for name, info in entries.items():
        (begin, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"]).float()
    return tensors


def write_safetensors(f, tensors, metadata=None):
    """The format read_safetensors reads, into the open binary file f: the JSON header (padded with spaces
    to a multiple of 8 bytes, so every tensor starts aligned), then each tensor's little-endian bytes in order."""
    dtypes = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(struct.pack("<Q", len(text)) + text)
    for tensor in tensors.values():
        f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


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


HUB = "https://huggingface.co"


def download_gpt2(name):
    """The hub's config.json and model.safetensors for a published GPT-2, cached in data/gpt2/NAME
    (or $GPT2_CACHE_DIR/NAME); returns that folder. model.safetensors is checked against the size and
    sha256 the hub states for it (download.download)."""
    if name not in GPT2_SIZES:
        raise ValueError(f"{name!r} is neither a published GPT-2 ({', '.join(GPT2_SIZES)}) nor an existing folder or "
                         f".safetensors file")
    folder = os.path.join(os.environ.get("GPT2_CACHE_DIR", "data/gpt2"), name)
    if not os.path.exists(os.path.join(folder, "model.safetensors")):  # a cached model.safetensors alone loads too
        for file in ("config.json", "model.safetensors"):
            download(f"{HUB}/{name}/resolve/main/{file}", os.path.join(folder, file), f"{name}'s {file}",
                     by_hand=f"on a machine with network access, download config.json and model.safetensors from "
                             f"{HUB}/{name} into {folder}, or pass --init a save_pretrained folder")
    return folder
