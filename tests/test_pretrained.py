"""GPT-2 weight loading: published sizes, Hugging Face save_pretrained folders and their config.json,
checked against a float64 NumPy forward pass written from the raw tensors; damaged safetensors refused."""
import hashlib
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from pretrained import GPT2_SIZES, load_gpt2, read_safetensors


# ---------------------------------------------------------------------------- GPT-2 weights
V, BLOCK, N_LAYER, N_EMBD, N_HEAD = 50, 16, 2, 32, 4  # 8-wide heads, not GPT-2's 64: only config.json tells


def gpt2_tensors(seed=0):
    """GPT-2's tensor names and layouts (Conv1D weights as (in, out)), random float32 values."""
    rng = np.random.default_rng(seed)
    C = N_EMBD

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or 1 / math.sqrt(shape[0]))).astype(np.float32)

    t = {"wte.weight": w(V, C, scale=0.5), "wpe.weight": w(BLOCK, C, scale=0.5)}
    for i in range(N_LAYER):
        p = f"h.{i}."
        t[p + "ln_1.weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
        t[p + "ln_1.bias"] = w(C, scale=0.1)
        t[p + "attn.c_attn.weight"] = w(C, 3 * C)
        t[p + "attn.c_attn.bias"] = w(3 * C, scale=0.1)
        t[p + "attn.c_proj.weight"] = w(C, C)
        t[p + "attn.c_proj.bias"] = w(C, scale=0.1)
        t[p + "ln_2.weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
        t[p + "ln_2.bias"] = w(C, scale=0.1)
        t[p + "mlp.c_fc.weight"] = w(C, 4 * C)
        t[p + "mlp.c_fc.bias"] = w(4 * C, scale=0.1)
        t[p + "mlp.c_proj.weight"] = w(4 * C, C)
        t[p + "mlp.c_proj.bias"] = w(C, scale=0.1)
    t["ln_f.weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    t["ln_f.bias"] = w(C, scale=0.1)
    return t


def write_safetensors(path, tensors):
    """float32 arrays as safetensors, their bytes back to back."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    write_raw_safetensors(path, header, b"".join(blobs))


def write_raw_safetensors(path, header, data):
    """The format by hand: 8-byte little-endian header length, JSON header, raw little-endian bytes."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def hf_config(**changes):
    """config.json as save_pretrained writes it (transformers 5, abridged) for the fixture's GPT-2."""
    config = {
        "activation_function": "gelu_new", "add_cross_attention": False, "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": N_EMBD,
        "n_head": N_HEAD, "n_inner": None, "n_layer": N_LAYER, "n_positions": BLOCK, "pad_token_id": None,
        "reorder_and_upcast_attn": False, "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True, "summary_activation": None, "summary_type": "cls_index",
        "tie_word_embeddings": True, "transformers_version": "5.24.0", "use_cache": True, "vocab_size": V,
    }
    return {**config, **changes}


# the hub's gpt2 config.json, sizes scaled down: older configs have n_ctx and lack the fields added since
HUB_STYLE_CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": BLOCK, "n_embd": N_EMBD, "n_head": N_HEAD,
    "n_layer": N_LAYER, "n_positions": BLOCK, "resid_pdrop": 0.1, "summary_activation": None,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": V,
}


def save_pretrained(folder, tensors, config=None, prefix="transformer.", buffers=False):
    """A folder as save_pretrained writes it: config.json and model.safetensors with HF's names (the
    `transformer.` prefix; older checkpoints also carry the causal-mask buffers). Returns it as a str."""
    folder.mkdir()
    on_disk = {prefix + k: v for k, v in tensors.items()}
    if buffers:  # not parameters: the loader must skip them
        for i in range(N_LAYER):
            on_disk[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, BLOCK, BLOCK), np.float32))
            on_disk[f"{prefix}h.{i}.attn.masked_bias"] = np.array([-1e4], np.float32)
    write_safetensors(folder / "model.safetensors", on_disk)
    (folder / "config.json").write_text(json.dumps(config or hf_config(), indent=2))
    return str(folder)


def reference_gpt2_logits(t, idx, n_head=N_HEAD, lm_head=None):
    """GPT-2 forward in float64 NumPy from the raw tensors: pre-LN blocks, causal attention,
    GELU (tanh), final LayerNorm and the head tied to wte (or `lm_head`, (V, C), an untied one).
    idx: list of token ids -> (T, V)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    T, C = len(idx), N_EMBD
    D = C // n_head

    def layernorm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][idx] + t["wpe.weight"][:T]
    for i in range(N_LAYER):
        p = f"h.{i}."
        h = layernorm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
        qkv = h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        y = np.zeros((T, C))
        for head in range(n_head):
            s = slice(head * D, (head + 1) * D)
            for query in range(T):
                scores = np.array([q[query, s] @ k[key, s] / math.sqrt(D) for key in range(query + 1)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                y[query, s] = weights @ v[:query + 1, s]
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = layernorm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
        x = x + gelu(h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    x = layernorm(x, t["ln_f.weight"], t["ln_f.bias"])
    return x @ (t["wte.weight"] if lm_head is None else lm_head.astype(np.float64)).T


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.mark.parametrize("prefix,buffers", [("", False), ("transformer.", True)], ids=["plain", "hf_prefix_and_mask_buffers"])
def test_gpt2_weights_load_one_to_one_from_safetensors(tmp_path, prefix, buffers):
    src = gpt2_tensors()
    model = load_gpt2(save_pretrained(tmp_path / "gpt2", src, prefix=prefix, buffers=buffers))
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (V, BLOCK, N_LAYER, N_HEAD, N_EMBD)
    checked = set()
    for name, param in model.named_parameters():
        key = name.removeprefix("transformer.")
        expected = src[key].T if key.endswith(CONV1D) else src[key]
        assert tuple(param.shape) == expected.shape, name
        assert np.array_equal(param.detach().numpy(), expected), name
        checked.add(key)
    assert checked == set(src)  # every GPT-2 tensor landed in some parameter
    assert np.array_equal(model.lm_head.weight.detach().numpy(), src["wte.weight"])


@pytest.mark.parametrize("target", ["folder", "model.safetensors"])
def test_save_pretrained_gpt2_logits_match_float64_reference_with_config_head_count(tmp_path, target):
    src = gpt2_tensors(seed=1)
    folder = save_pretrained(tmp_path / "gpt2", src)
    model = load_gpt2(folder if target == "folder" else folder + "/model.safetensors").eval()
    idx = [int(i) for i in np.random.default_rng(2).integers(0, V, size=BLOCK)]
    expected = reference_gpt2_logits(src, idx)
    assert np.abs(expected).max() > 1.0  # logits large enough that the comparison means something
    guessed = reference_gpt2_logits(src, idx, n_head=max(1, N_EMBD // 64))  # GPT-2's 64-wide heads: 1 here
    assert np.abs(guessed - expected).max() > 1.0  # so a guessed head count fails this test
    with torch.no_grad():
        logits = model(torch.tensor([idx]))[0].double().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [hf_config(activation_function="gelu_pytorch_tanh"), hf_config(n_inner=4 * N_EMBD),
                                    hf_config(reorder_and_upcast_attn=True), HUB_STYLE_CONFIG],
                         ids=["gelu_pytorch_tanh", "explicit_n_inner", "reorder_and_upcast_attn", "hub_style"])
def test_config_of_the_same_computation_loads(tmp_path, config):
    assert load_gpt2(save_pretrained(tmp_path / "gpt2", gpt2_tensors(), config)).config.n_head == N_HEAD


@pytest.mark.parametrize("field,value", [
    ("layer_norm_epsilon", 1e-6), ("activation_function", "gelu"), ("activation_function", "relu"),
    ("n_inner", 2 * N_EMBD), ("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
    ("add_cross_attention", True), ("tie_word_embeddings", False), ("model_type", "gpt_neo"),
])
def test_config_this_gpt_computes_differently_is_refused_naming_the_field(tmp_path, field, value):
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors(), hf_config(**{field: value}))
    with pytest.raises(ValueError) as error:
        load_gpt2(folder)
    message = str(error.value)
    assert f"{field} is {json.dumps(value)}" in message and "only represents standard GPT-2" in message
    assert "\n" not in message


@pytest.mark.parametrize("n_head", [5, 0, None])
def test_config_head_count_that_does_not_split_n_embd_is_refused(tmp_path, n_head):
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors(), hf_config(n_head=n_head))
    with pytest.raises(ValueError) as error:
        load_gpt2(folder)
    assert f"n_head is {json.dumps(n_head)}" in str(error.value)


@pytest.mark.parametrize("field,value", [("n_embd", 64), ("n_layer", 3), ("n_positions", 1024), ("vocab_size", 50257)])
def test_config_that_disagrees_with_the_weights_is_refused(tmp_path, field, value):
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors(), hf_config(**{field: value}))
    with pytest.raises(ValueError) as error:
        load_gpt2(folder)
    assert f"{field} is {value} but the weights beside it have" in str(error.value)


def test_config_json_that_is_not_json_is_refused_naming_it(tmp_path):
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors())
    (tmp_path / "gpt2" / "config.json").write_text("n_head = 4\n")
    with pytest.raises(ValueError, match="config.json is not a JSON config"):
        load_gpt2(folder)


def test_bare_safetensors_of_an_unpublished_size_is_refused_asking_for_config(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, gpt2_tensors())
    with pytest.raises(ValueError, match="not a published size.*head count is unknown.*config.json"):
        load_gpt2(str(path))


def test_published_size_loads_from_the_download_cache_without_config(tmp_path, monkeypatch):
    monkeypatch.setitem(GPT2_SIZES, "gpt2-tiny", dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD))  # fits a test
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    (tmp_path / "gpt2-tiny").mkdir()
    write_safetensors(tmp_path / "gpt2-tiny" / "model.safetensors", gpt2_tensors())  # cached before config.json was
    assert load_gpt2("gpt2-tiny").config.n_head == N_HEAD


def test_folder_without_model_safetensors_is_refused(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        load_gpt2(str(tmp_path / "gpt2"))


def test_gpt2_tensor_of_wrong_shape_raises_value_error_naming_it(tmp_path):
    src = gpt2_tensors()
    src["h.1.mlp.c_fc.bias"] = src["h.1.mlp.c_fc.bias"][:100]
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias.*shape"):
        load_gpt2(save_pretrained(tmp_path / "gpt2", src))


def test_gpt2_conv1d_weight_stored_as_linear_raises_value_error(tmp_path):
    src = gpt2_tensors()
    src["h.0.attn.c_attn.weight"] = np.ascontiguousarray(src["h.0.attn.c_attn.weight"].T)  # (out, in)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight"):
        load_gpt2(save_pretrained(tmp_path / "gpt2", src))


def test_gpt2_file_missing_a_tensor_raises_value_error_naming_it(tmp_path):
    src = gpt2_tensors()
    del src["h.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"h\.1\.ln_2\.bias"):
        load_gpt2(save_pretrained(tmp_path / "gpt2", src))


def gptj_like_tensors():
    """A foreign decoder with GPT-2-like names but rotary positions: no wpe, other attention names."""
    rng = np.random.default_rng(0)
    t = {"transformer.wte.weight": rng.standard_normal((V, 64)).astype(np.float32)}
    for name in ("ln_1.weight", "ln_1.bias", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                 "attn.out_proj.weight", "mlp.fc_in.weight", "mlp.fc_out.weight"):
        t[f"transformer.h.0.{name}"] = rng.standard_normal(64).astype(np.float32)
    t["transformer.ln_f.weight"] = rng.standard_normal(64).astype(np.float32)
    t["lm_head.weight"] = rng.standard_normal((V, 64)).astype(np.float32)
    return t


@pytest.mark.parametrize("kind", ["no_wte", "gptj_like", "not_safetensors", "truncated"])
def test_foreign_or_damaged_weight_file_raises_value_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "weights.safetensors"
    if kind == "no_wte":
        write_safetensors(path, {"encoder.embed_tokens.weight": np.ones((V, 8), np.float32)})
    elif kind == "gptj_like":
        write_safetensors(path, gptj_like_tensors())
    elif kind == "not_safetensors":
        path.write_bytes(b"this is a text file, not a tensor file\n" * 20)
    else:
        write_safetensors(path, gpt2_tensors())
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_gpt2(str(path))


# ---------------------------------------------------------------------------- damaged safetensors headers
def test_safetensors_loads_byte_exactly(tmp_path):
    src = {**gpt2_tensors(), "scalar": np.array(-0.0, np.float32), "empty": np.zeros((0, 3), np.float32)}
    write_safetensors(tmp_path / "w.safetensors", src)
    loaded = read_safetensors(str(tmp_path / "w.safetensors"))
    assert set(loaded) == set(src)
    for name, array in src.items():
        assert loaded[name].numpy().tobytes() == array.tobytes() and loaded[name].shape == array.shape, name


TWO_FLOATS = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}  # tensor a; b takes the next 8 bytes


@pytest.mark.parametrize("header,problem", [
    ([1, 2], "its header is a JSON list, not an object"),
    ({"a": [0, 8]}, "tensor a is [0, 8], not an object"),
    ({"a": {**TWO_FLOATS, "dtype": "Q7"}}, 'tensor a has dtype "Q7"'),
    ({"a": {**TWO_FLOATS, "dtype": ["F32"]}}, 'tensor a has dtype ["F32"]'),
    ({"a": {**TWO_FLOATS, "shape": "2"}}, 'tensor a has shape "2", not a list of sizes'),
    ({"a": {**TWO_FLOATS, "shape": [-2]}}, "tensor a has shape [-2], not a list of sizes"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "tensor a has data_offsets null"),
    ({"a": {**TWO_FLOATS, "data_offsets": [-8, 8]}}, "tensor a has data_offsets [-8, 8]"),
    ({"a": {**TWO_FLOATS, "data_offsets": [False, 8]}}, "tensor a has data_offsets [false, 8]"),
    ({"a": {**TWO_FLOATS, "data_offsets": [8, 0]}}, "tensor a has data_offsets [8, 0]"),
    ({"a": {**TWO_FLOATS, "data_offsets": [8, 16, 24]}}, "tensor a has data_offsets [8, 16, 24]"),
    ({"a": {**TWO_FLOATS, "data_offsets": [8, 24]}}, "not [begin, end] within the 16 data bytes"),
    ({"a": {**TWO_FLOATS, "shape": [4]}}, "tensor a has shape [4] of F32, 16 bytes, but its data_offsets span 8"),
    ({"a": {**TWO_FLOATS, "shape": [1]}}, "tensor a has shape [1] of F32, 4 bytes, but its data_offsets span 8"),
    ({"a": TWO_FLOATS, "b": {**TWO_FLOATS, "data_offsets": [4, 12]}}, "tensors a and b share bytes"),
    ({"a": {**TWO_FLOATS, "shape": [4], "data_offsets": [0, 16]},
      "b": {**TWO_FLOATS, "shape": [1], "data_offsets": [4, 8]}}, "tensors a and b share bytes"),
], ids=["list_header", "entry_not_object", "unknown_dtype", "list_dtype", "string_shape", "negative_size",
        "missing_offsets", "negative_begin", "bool_offset", "begin_after_end", "three_offsets", "end_past_data",
        "shape_larger_than_bytes", "shape_smaller_than_bytes", "overlapping_offsets", "offsets_inside_another"])
def test_damaged_safetensors_header_is_refused_naming_file_and_problem(tmp_path, header, problem):
    path = tmp_path / "weights.safetensors"
    write_raw_safetensors(path, header, np.arange(4, dtype="<f4").tobytes())  # 16 data bytes
    with pytest.raises(ValueError) as error:
        read_safetensors(str(path))
    message = str(error.value)
    assert str(path) in message and problem in message and "\n" not in message


def test_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")  # read up to the end, the header would parse as empty
    with pytest.raises(ValueError, match=r"weights\.safetensors .*header length 9223372036854775808 exceeds"):
        read_safetensors(str(path))


def test_directory_given_as_weight_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} cannot be read"):
        read_safetensors(str(tmp_path))


@pytest.mark.parametrize("content", ["[]", "3", '"gpt2"', "[" * 100_000])
def test_a_config_json_that_is_not_an_object_is_a_one_line_error_naming_it(tmp_path, content):
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors())
    (tmp_path / "gpt2" / "config.json").write_text(content)
    with pytest.raises(ValueError, match="config.json"):
        load_gpt2(folder)


def test_sft_refuses_a_consistent_gpt2_whose_vocabulary_is_smaller_than_the_tokenizer(tmp_path):
    import sft
    from cli import UserError
    folder = save_pretrained(tmp_path / "gpt2", gpt2_tensors())  # a 50-token vocabulary, every size consistent
    with pytest.raises(UserError, match="fewer than the 50,257"):
        sft.build_model(sft.SFTConfig(init=folder), "cpu")


# ---------------------------------------------------------------------------- the download of published weights
class Hub:
    """A local stand-in for the Hugging Face hub: config.json served directly; model.safetensors, a large
    file, through a redirect whose headers state its size and sha256 (X-Linked-Size, X-Linked-Etag)."""

    def __init__(self, files, stated_sha256=None):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, body):
                name = self.path.rsplit("/", 1)[-1]
                if "/resolve/" in self.path and name == "model.safetensors":
                    self.send_response(302)
                    self.send_header("Location", "/blob/model.safetensors")
                    self.send_header("X-Linked-Size", str(len(files[name])))
                    self.send_header("X-Linked-Etag", f'"{stated_sha256 or hashlib.sha256(files[name]).hexdigest()}"')
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(files[name])))
                self.end_headers()
                if body:
                    self.wfile.write(files[name])

            def do_HEAD(self):
                self.answer(False)

            def do_GET(self):
                self.answer(True)
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def tiny_hub_files(tmp_path):
    write_safetensors(tmp_path / "weights.safetensors", gpt2_tensors())
    return {"config.json": json.dumps(hf_config()).encode(), "model.safetensors": (tmp_path / "weights.safetensors").read_bytes()}


@pytest.fixture
def tiny_published(tmp_path, monkeypatch):
    monkeypatch.setitem(GPT2_SIZES, "gpt2-tiny", dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD))
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gpt2-tiny"


def test_published_weights_download_once_checked_against_the_hubs_size_and_sha256(tmp_path, tiny_published, monkeypatch):
    import pretrained
    hub = Hub(tiny_hub_files(tmp_path))
    monkeypatch.setattr(pretrained, "HUB", hub.url)
    model = load_gpt2("gpt2-tiny")
    assert model.config.n_head == N_HEAD and sorted(os.listdir(tiny_published)) == ["config.json", "model.safetensors"]
    hub.server.shutdown()  # cached: no second download
    assert load_gpt2("gpt2-tiny").config.n_layer == N_LAYER


def test_a_download_that_does_not_match_the_hubs_sha256_is_refused_and_leaves_no_weights(tmp_path, tiny_published, monkeypatch):
    import pretrained
    from cli import UserError
    hub = Hub(tiny_hub_files(tmp_path), stated_sha256="0" * 64)
    monkeypatch.setattr(pretrained, "HUB", hub.url)
    with pytest.raises(UserError, match=r"the download of gpt2-tiny's model.safetensors from .* is damaged .* expected \d+ bytes, sha256 0{64}"):
        load_gpt2("gpt2-tiny")
    assert "model.safetensors" not in os.listdir(tiny_published) and not any(f.endswith(".part") for f in os.listdir(tiny_published))


def test_no_network_is_one_line_saying_how_to_get_the_weights_by_hand(tiny_published, monkeypatch):
    import pretrained
    from cli import UserError
    monkeypatch.setattr(pretrained, "HUB", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(UserError, match=r"could not download gpt2-tiny's config.json from .*; on a machine with network "
                                        r"access, download config.json and model.safetensors from .* into .*gpt2-tiny"):
        load_gpt2("gpt2-tiny")
