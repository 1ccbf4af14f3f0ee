"""Trustworthy runs: a SIGKILL mid-run resumes on the same trajectory, bad input is refused
clearly without touching earlier outputs, and the same seed gives the same run."""
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dpo
import reward
import sample
import sft
import train
from checkpoint import load_checkpoint, load_model, read_jsonl, save_checkpoint
from cli import UserError, parse_config
from conftest import save_tiny_checkpoint, tiny_gpt
from optim import apply_gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_args(archive, out, extra=()):
    return [os.path.join(ROOT, "sft.py"), "--preset", "smoke", "--data", archive, "--no-data-verify", "--out", str(out),
            "--max-steps", "12", "--save-interval", "3", "--log-interval", "1", "--eval-interval", "12",
            "--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--device", "cpu", *extra]


def final_loss(out):
    rows = read_jsonl(os.path.join(out, "sft_log.jsonl"))
    return [r for r in rows if r["step"] == 12][-1]["loss"]


def test_sigkill_mid_run_resumes_past_step_0_and_ends_on_the_same_loss(tmp_path, tiny_imdb):
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable] + sft_args(tiny_imdb, tmp_path / "straight"), cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable] + sft_args(tiny_imdb, killed), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "sft.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = torch.load(killed / "sft.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 12
    resumed = subprocess.run([sys.executable] + sft_args(tiny_imdb, killed), cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
    assert f"resuming {killed / 'sft.pt'} at step {step_at_kill}\n" in resumed.stdout
    assert final_loss(killed) == pytest.approx(final_loss(tmp_path / "straight"), rel=1e-6)
    a = torch.load(killed / "sft.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "sft.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_losses(tmp_path, tiny_imdb):
    from data import load_imdb
    imdb = load_imdb(tiny_imdb, cache_dir=str(tmp_path / "cache"), verify=False)
    stream = np.concatenate([imdb["train"].tokens, imdb["unsup"].tokens])
    logs = []
    for run in ("a", "b"):
        cfg = sft.SFTConfig(out=str(tmp_path / run), n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4,
                            max_steps=5, log_interval=1, eval_interval=5, eval_batches=1, device="cpu", dropout=0.1)
        sft.train_lm(cfg, stream, imdb["test"].tokens)
        logs.append([row["loss"] for row in read_jsonl(tmp_path / run / "sft_log.jsonl")])
    assert logs[0] == logs[1] and len(set(logs[0])) > 1


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    good = save_tiny_checkpoint(tmp_path / "sft.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:2000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path, message in ((truncated, "not a readable checkpoint"), (text, "not a readable checkpoint"),
                          (tmp_path / "missing.pt", "checkpoint not found")):
        with pytest.raises(UserError, match=message):
            load_model(str(path))
    with pytest.raises(UserError, match="holds a 'reward' checkpoint"):
        load_model(save_tiny_checkpoint(tmp_path / "reward.pt", kind="reward"))
    # a checkpoint of a different model size than the run in that folder
    out = tmp_path / "resume"
    cfg = dpo.DPOConfig(sft=good, pairs="unused", out=str(out), device="cpu")
    os.makedirs(out)
    other = save_tiny_checkpoint(out / "dpo.pt", tiny_gpt(n_embd=32), kind="dpo")
    wrong_size = torch.load(other, weights_only=True)
    wrong_size["config"] = dataclasses.asdict(cfg)
    save_checkpoint(other, wrong_size)
    before = digest(other)
    with pytest.raises(UserError, match="does not fit this model"):
        dpo.train_dpo(cfg, pairs=[dpo.PreferencePair([1, 2], [3], [4])])
    assert digest(other) == before  # the file is left as it was


def test_a_checkpoint_cannot_run_code(tmp_path):
    """weights_only loading: a pickle that would call a function is refused, and the function never runs."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "payload": Exploit()}, path)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_out_folder_of_another_run_is_refused_and_left_untouched(tmp_path, tiny_imdb):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data", tiny_imdb, "--no-data-verify", "--out", str(out), "--device", "cpu"]
    os.makedirs(out)
    other = train.TrainConfig(**{**train.PRESETS["smoke"], "n_embd": 96})
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(other)))
    (out / "sft.pt").write_bytes(b"earlier output")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2
    assert "config.json belongs to a run with a different config (n_embd: 96 vs 64)" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "sft.pt").read_bytes() == b"earlier output"
    assert json.loads((out / "config.json").read_text())["n_embd"] == 96


def test_checkpoint_of_another_sft_run_in_out_is_refused_not_reused(tmp_path, tiny_imdb):
    """`python sft.py` (its own settings) then `python train.py` in the same folder: train.py must not
    skip its SFT stage on the strength of a finished checkpoint of a different run."""
    out = tmp_path / "run"
    sft_run = sft.SFTConfig(**{**sft.PRESETS["smoke"], "out": str(out)})  # block_size 64, 30 steps
    ckpt = save_tiny_checkpoint(out / "sft.pt")
    finished = torch.load(ckpt, weights_only=True)
    finished.update(config=dataclasses.asdict(sft_run), step=sft_run.max_steps)
    save_checkpoint(ckpt, finished)
    before = digest(ckpt)
    args = ["--preset", "smoke", "--data", tiny_imdb, "--no-data-verify", "--out", str(out), "--device", "cpu"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stdout[-2000:]
    assert "sft.pt belongs to a run with a different config" in result.stderr and "block_size: 64 vs 48" in result.stderr
    assert "Traceback" not in result.stderr and "done already" not in result.stdout
    assert digest(ckpt) == before


@pytest.mark.parametrize("config_cls, presets, argv, message", [
    (train.TrainConfig, train.PRESETS, ["--betas", "0.1,0"], "every beta must be > 0"),
    (train.TrainConfig, train.PRESETS, ["--betas", "a,b"], "comma-separated numbers"),
    (train.TrainConfig, train.PRESETS, ["--dpo-batch-size", "0"], "--dpo-batch-size must be positive"),
    (train.TrainConfig, train.PRESETS, ["--max-new-tokens", "-4"], "--max-new-tokens must be positive"),
    (train.TrainConfig, train.PRESETS, ["--stage", "ppo"], "--stage must be all or one of"),
    (train.TrainConfig, train.PRESETS, ["--methods", "dpo,ppo"], "--methods must be all or a comma-separated list of"),
    (train.TrainConfig, train.PRESETS, ["--methods", ","], "--methods must be all or a comma-separated list of"),
    (train.TrainConfig, train.PRESETS, ["--preset", "tpu"], "invalid choice: 'tpu'"),
    (train.TrainConfig, train.PRESETS, ["--preset", "gpu", "--n-prefixes", "4"], "Preferred-FT trains on windows"),
    (dpo.DPOConfig, None, ["--beta", "-0.1"], "--beta must be > 0"),
    (dpo.DPOConfig, None, ["--batch-size", "64", "--micro-batch-size", "48"], "must be a multiple of"),
    (dpo.DPOConfig, None, ["--loss-type", "kto"], "--loss-type must be sigmoid, ipo or hinge"),
    (sft.SFTConfig, sft.PRESETS, ["--batch-size", "0"], "--batch-size must be positive"),
    (reward.RewardConfig, None, ["--max-len", "4", "--min-len", "8"], "must not exceed"),
    (sample.SampleConfig, None, ["--top-p", "1.5"], "--top-p must be in"),
])
def test_out_of_range_flags_are_rejected_before_any_work(config_cls, presets, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_cls, argv, presets=presets, default_preset="cpu" if presets else None)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_step_and_leaves_weights_alone():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    loss = (model(torch.ones(2, 3)) * float("inf")).sum()
    loss.backward()
    with pytest.raises(FloatingPointError, match="non-finite loss at step 41"):
        apply_gradients(model, optimizer, {"loss": loss.item()}, 0.1, 1.0, step=41)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_scripts_chain_through_their_default_paths(tmp_path, tiny_imdb):
    """`python sft.py`, then sample.py, reward.py and dpo.py with no path flags: each finds what the
    one before it wrote (the README's walk-through of the scripts)."""
    env = {**os.environ, "IMDB_ARCHIVE": tiny_imdb, "PYTHONPATH": ROOT}

    def script(name, *args):
        result = subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    script("sft.py", "--preset", "smoke", "--no-data-verify", "--max-steps", "2")
    assert "--- sample 3" in script("sample.py")  # no flags at all: out/sft/sft.pt, 4 samples
    script("reward.py", "--no-data-verify", "--max-steps", "2", "--batch-size", "4", "--test-reviews", "8")
    assert (tmp_path / "out" / "reward" / "reward.pt").exists()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Review {i}:", "chosen": " a delight.", "rejected": " a bore."}) + "\n")
    script("dpo.py", "--pairs", "pairs.jsonl", "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "2")
    assert "--- sample 0" in script("sample.py", "--ckpt", os.path.join("out", "dpo", "dpo.pt"), "--n", "1")
