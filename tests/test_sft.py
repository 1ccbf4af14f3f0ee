"""SFT: the loss falls on a learnable token stream; a run interrupted after a checkpoint and resumed
ends exactly where the uninterrupted run ends; bad checkpoints, configs and flags are user errors."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sft
from checkpoint import load_model, read_jsonl
from cli import UserError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERN = np.array([5, 17, 3, 99, 42, 7], dtype=np.uint16)
STREAM = np.tile(PATTERN, 400)  # a token stream with 6 distinct tokens, each always followed by the same one


def tiny_config(out, **overrides):
    values = dict(out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, steps=6,
                  warmup_steps=2, lr=3e-2, min_lr=3e-3, log_interval=1, eval_interval=1000, eval_batches=1,
                  save_interval=3, seed=0, device="cpu", compile=False)
    values.update(overrides)
    return sft.SFTConfig(**values)


def read_log(out, name="sft"):
    return read_jsonl(os.path.join(out, f"{name}_log.jsonl"))


def float64_loss(model, tokens, length=16):
    """Mean next-token cross-entropy over 12 windows at every phase of the pattern, by log-sum-exp in float64."""
    windows = torch.from_numpy(np.stack([tokens[s:s + length + 1].astype(np.int64) for s in range(0, 60, 5)]))
    with torch.no_grad():
        logits = model(windows[:, :-1]).double()  # (B, T, V)
    log_z = logits.max(-1, keepdim=True).values + (logits - logits.max(-1, keepdim=True).values).exp().sum(-1, keepdim=True).log()
    target = logits.gather(-1, windows[:, 1:, None])
    return float((log_z - target).mean())


def test_sft_lowers_the_next_token_loss_from_uniform(tmp_path):
    cfg = tiny_config(tmp_path, steps=15, save_interval=15)
    path = sft.train_lm(cfg, STREAM, STREAM)
    log = read_log(tmp_path)
    assert [row["step"] for row in log] == list(range(1, 16))
    assert abs(log[0]["loss"] - math.log(50257)) < 0.1  # a fresh model is close to uniform over GPT-2's vocabulary
    model = load_model(path).eval()
    final = float64_loss(model, STREAM)
    assert final < 3.0, f"loss only fell from {log[0]['loss']:.2f} to {final:.2f}"
    assert abs(log[-1]["val_loss"] - final) < 0.2  # the logged validation loss measures the same thing


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go, checkpointing every 3; dropout on, so the resumed run must restore the RNG too."""
    out = tmp_path_factory.mktemp("uninterrupted")
    sft.train_lm(tiny_config(out, dropout=0.1), STREAM, STREAM)
    return out


class Interrupted(Exception):
    pass


def test_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path
    real_step = sft.sft_step

    def crash_at_step_3(model, optimizer, micro_batches, lr, grad_clip, step, forward=None):
        if step == 3:  # after the step-3 checkpoint was written, before step 4 changes anything
            raise Interrupted
        return real_step(model, optimizer, micro_batches, lr, grad_clip, step, forward)

    monkeypatch.setattr(sft, "sft_step", crash_at_step_3)
    with pytest.raises(Interrupted):
        sft.train_lm(tiny_config(out, dropout=0.1), STREAM, STREAM)
    assert torch.load(out / "sft.pt", weights_only=True)["step"] == 3

    steps_run = []

    def counting(model, optimizer, micro_batches, lr, grad_clip, step, forward=None):
        steps_run.append(step)
        return real_step(model, optimizer, micro_batches, lr, grad_clip, step, forward)

    monkeypatch.setattr(sft, "sft_step", counting)
    capsys.readouterr()
    sft.train_lm(tiny_config(out, dropout=0.1), STREAM, STREAM)
    assert steps_run == [3, 4, 5]  # resumed at step 3, not from scratch
    assert "at step 3\n" in capsys.readouterr().out

    a = torch.load(uninterrupted / "sft.pt", weights_only=True)
    b = torch.load(out / "sft.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=1e-6, msg=name)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for i in state_a:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_b[i][key], state_a[i][key], rtol=0, atol=1e-7, msg=f"{i}.{key}")
    # the resumed run logged steps 4..6 once each, with the uninterrupted run's losses
    log_a, log_b = read_log(uninterrupted), read_log(out)
    assert [row["step"] for row in log_b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in log_b], [r["loss"] for r in log_a], rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", [dict(n_embd=32), dict(lr=1e-2), dict(steps=9)], ids=lambda c: next(iter(c)))
def test_resuming_with_a_different_config_raises_user_error(uninterrupted, change):
    before = (uninterrupted / "sft.pt").read_bytes()
    with pytest.raises(UserError, match=f"different settings.*{next(iter(change))}"):
        sft.train_lm(tiny_config(uninterrupted, **change), STREAM, STREAM)
    assert (uninterrupted / "sft.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "wrong_kind"])
def test_unreadable_checkpoint_raises_user_error_and_is_left_untouched(uninterrupted, tmp_path, damage):
    good = (uninterrupted / "sft.pt").read_bytes()
    if damage == "random_bytes":
        bad = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    elif damage == "truncated":
        bad = good[:len(good) // 2]
    elif damage == "empty":
        bad = b""
    else:
        ckpt = torch.load(uninterrupted / "sft.pt", weights_only=True)
        ckpt["kind"] = "dpo"
        torch.save(ckpt, tmp_path / "dpo.pt")
        bad = (tmp_path / "dpo.pt").read_bytes()
    path = tmp_path / "sft.pt"
    path.write_bytes(bad)
    expected = "holds a 'dpo' checkpoint" if damage == "wrong_kind" else "not a readable checkpoint"
    with pytest.raises(UserError, match=expected) as error:
        sft.train_lm(tiny_config(tmp_path), STREAM, STREAM)
    assert str(path) in str(error.value)
    assert path.read_bytes() == bad
    assert sorted(os.listdir(tmp_path)) == sorted(["sft.pt"] + (["dpo.pt"] if damage == "wrong_kind" else []))


def test_token_stream_shorter_than_one_window_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="training text holds 10 tokens"):
        sft.train_lm(tiny_config(tmp_path), STREAM[:10], STREAM)


# ---------------------------------------------------------------------------- flags and the command line
def test_preset_then_flags_set_the_config():
    cfg = parse_config(sft.SFTConfig, ["--preset", "smoke", "--lr", "0.01", "--no-compile", "--data", "x.tar.gz"],
                       presets=sft.PRESETS)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.steps) == (2, 2, 64, 64, 8, 30)
    assert cfg.lr == 0.01 and cfg.compile is False and cfg.data == "x.tar.gz"
    assert cfg.weight_decay == 0.1  # neither preset nor flag: the dataclass default


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--preset", "smoke", "--steps", "-5"], "--steps must be positive"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr"),
    (["--preset", "enormous"], "invalid choice"),
    (["--batch-size", "many"], "invalid int value"),
])
def test_invalid_flags_exit_with_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(sft.SFTConfig, argv, presets=sft.PRESETS)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_path_exits_with_a_one_line_error_and_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IMDB_ARCHIVE"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--data", "/nonexistent.tar.gz", "--preset", "smoke"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent.tar.gz" in lines[0], result.stderr
    assert os.listdir(tmp_path) == []  # nothing written: no out/, no data/ cache


def test_sft_step_with_a_compiled_like_wrapper_takes_the_same_step_as_with_the_model():
    """train_lm hands sft_step torch.compile's wrapper on CUDA, which has no truth value: the step
    must call it, and move the weights exactly as calling the model itself does."""
    from conftest import NoTruthValue, tiny_gpt
    windows = torch.from_numpy(np.stack([STREAM[s:s + 17].astype(np.int64) for s in range(0, 40, 5)]))
    results = []
    for wrap in (False, True):
        model = tiny_gpt(seed=0, vocab_size=128, block_size=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        metrics = sft.sft_step(model, optimizer, [windows[:4], windows[4:]], 0.1, 0.0, 0,
                               forward=NoTruthValue(model) if wrap else None)
        results.append((metrics["loss"], [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
