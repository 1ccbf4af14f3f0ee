"""Trustworthy runs: a SIGKILL mid-run resumes on the same trajectory, bad input is refused
clearly without touching earlier outputs, and the same seed gives the same run."""
import dataclasses
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dpo
import report
import reward
import sample
import sft
import train
from checkpoint import append_jsonl, atomic_write, load_checkpoint, load_model, read_jsonl, run_identity, save_checkpoint, write_jsonl
from cli import UserError, parse_config, run_main
from conftest import kill_when_written, save_tiny_checkpoint, tiny_gpt
from optim import apply_gradients
from pretrained import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_args(archive, out, extra=()):
    return [os.path.join(ROOT, "sft.py"), "--preset", "smoke", "--data", archive, "--no-data-verify", "--out", str(out),
            "--steps", "12", "--save-interval", "3", "--log-interval", "1", "--eval-interval", "12",
            "--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--device", "cpu", *extra]


def final_loss(out):
    rows = read_jsonl(os.path.join(out, "sft_log.jsonl"))
    return [r for r in rows if r["step"] == 12][-1]["loss"]


def test_sigkill_mid_run_resumes_past_step_0_and_ends_on_the_same_loss(tmp_path, tiny_imdb):
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable] + sft_args(tiny_imdb, tmp_path / "straight"), cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    kill_when_written(sft_args(tiny_imdb, killed), killed / "sft.pt", tmp_path, env)
    step_at_kill = torch.load(killed / "sft.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 12
    resumed = subprocess.run([sys.executable] + sft_args(tiny_imdb, killed), cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
    assert f"resuming {killed / 'sft.pt'} at step {step_at_kill}\n" in resumed.stdout
    assert final_loss(killed) == pytest.approx(final_loss(tmp_path / "straight"), rel=1e-6)
    a = torch.load(killed / "sft.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "sft.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_killed_mid_run_resumes_and_ends_on_the_same_weights(tmp_path, tiny_imdb):
    """PPO's checkpoint holds the policy, the critic, both optimizers, beta_KL and the reward's
    normalisation: a SIGKILL'd run, rerun, ends bit-identical to one never interrupted."""
    sft_path = save_tiny_checkpoint(tmp_path / "sft.pt")
    torch.manual_seed(1)
    judge = reward.GPTClassifier(tiny_gpt().config)  # any classifier checkpoint is a reward; this one a Bradley-Terry model
    save_checkpoint(str(tmp_path / "rm.pt"), {"kind": "reward", "classifier": "bradley_terry", "model": judge.state_dict(),
                                               "model_config": dataclasses.asdict(judge.config)})

    def args(out):
        return [os.path.join(ROOT, "ppo.py"), "--sft", sft_path, "--reward", str(tmp_path / "rm.pt"), "--data", tiny_imdb,
                "--no-data-verify", "--n-prefixes", "16", "--max-new-tokens", "6", "--steps", "6", "--batch-size", "8",
                "--minibatch-size", "4", "--norm-samples", "8", "--save-interval", "1", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable] + args(tmp_path / "straight"), cwd=tmp_path, env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    kill_when_written(args(killed), killed / "ppo.pt", tmp_path, env)
    step_at_kill = torch.load(killed / "ppo.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 6
    resumed = subprocess.run([sys.executable] + args(killed), cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert f"resuming {killed / 'ppo.pt'} at step {step_at_kill}\n" in resumed.stdout
    a, b = (torch.load(out / "ppo.pt", weights_only=True) for out in (killed, tmp_path / "straight"))
    assert a["step"] == b["step"] == 6 and a["kl_coef"] == b["kl_coef"] and a["normalise"] == b["normalise"]
    for part in ("model", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_same_seed_gives_identical_losses(tmp_path, tiny_imdb):
    from data import load_imdb
    imdb = load_imdb(tiny_imdb, cache_dir=str(tmp_path / "cache"), verify=False)
    stream = np.concatenate([imdb["train"].tokens, imdb["unsup"].tokens])
    logs = []
    for run in ("a", "b"):
        cfg = sft.SFTConfig(out=str(tmp_path / run), n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4,
                            steps=5, log_interval=1, eval_interval=5, eval_batches=1, device="cpu", dropout=0.1)
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
    wrong_size["run"] = run_identity(cfg, dpo.RESUME_FIELDS)
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


def test_checkpoint_of_another_sft_run_in_out_is_refused_not_reused(tmp_path, tiny_imdb):
    """`python sft.py` (its own settings) then `python train.py` in the same folder: train.py must not
    skip its SFT stage on the strength of a finished checkpoint of a different run."""
    out = tmp_path / "run"
    sft_run = sft.SFTConfig(**{**sft.PRESETS["smoke"], "out": str(out)})  # block_size 64, 30 steps
    ckpt = save_tiny_checkpoint(out / "sft.pt")
    finished = torch.load(ckpt, weights_only=True)
    finished.update(config=dataclasses.asdict(sft_run), run=run_identity(sft_run, sft.RESUME_FIELDS), step=sft_run.steps)
    save_checkpoint(ckpt, finished)
    before = digest(ckpt)
    args = ["--preset", "smoke", "--data", tiny_imdb, "--no-data-verify", "--out", str(out), "--device", "cpu"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stdout[-2000:]
    assert "sft.pt belongs to a run with different settings" in result.stderr and "block_size: 64 vs 48" in result.stderr
    assert "Traceback" not in result.stderr and "done already" not in result.stdout
    assert digest(ckpt) == before


@pytest.mark.parametrize("config_cls, presets, argv, message", [
    (train.TrainConfig, train.PRESETS, ["--betas", "0.1,0"], "every value of --betas must be finite and > 0"),
    (train.TrainConfig, train.PRESETS, ["--betas", "a,b"], "comma-separated numbers"),
    (train.TrainConfig, train.PRESETS, ["--dpo-batch-size", "0"], "--dpo-batch-size and --dpo-micro-batch-size must be positive"),
    (train.TrainConfig, train.PRESETS, ["--max-new-tokens", "-4"], "--max-new-tokens must be positive"),
    (train.TrainConfig, train.PRESETS, ["--stage", "ppo"], "--stage must be all or one of"),
    (train.TrainConfig, train.PRESETS, ["--methods", "dpo,ppx"], "--methods must be figure2, dpo-family, dpo-offline, dpo-online, all or a comma-separated list of"),
    (train.TrainConfig, train.PRESETS, ["--methods", ","], "--methods must be figure2, dpo-family, dpo-offline, dpo-online, all or a comma-separated list of"),
    (train.TrainConfig, train.PRESETS, ["--preset", "tpu"], "invalid choice: 'tpu'"),
    (train.TrainConfig, train.PRESETS, ["--preset", "gpu", "--n-prefixes", "4"], "Preferred-FT trains on windows"),
    (train.TrainConfig, train.PRESETS, ["--online-reward", "rm"], "--online-reward must be ground_truth or learned, got 'rm'"),
    (train.TrainConfig, train.PRESETS, ["--rso-accept", "9"], "2 <= --rso-accept <= --rso-candidates"),
    (train.TrainConfig, train.PRESETS, ["--rso-prefixes", "5000"], "0 < --rso-prefixes <= --n-prefixes"),
    (train.TrainConfig, train.PRESETS, ["--sppo-prompts-per-iteration", "7"], "must split into batches of --sppo-batch-size 32"),
    (train.TrainConfig, train.PRESETS, ["--sppo-eta", "0"], "--sppo-eta must be > 0"),
    (dpo.DPOConfig, None, ["--beta", "-0.1"], "--beta must be > 0"),
    (dpo.DPOConfig, None, ["--batch-size", "64", "--micro-batch-size", "48"], "must be a multiple of"),
    (dpo.DPOConfig, None, ["--loss-type", "dop"], "--loss-type must be one of sigmoid, ipo, hinge, kto"),
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

    script("sft.py", "--preset", "smoke", "--no-data-verify", "--steps", "2")
    assert "--- sample 3" in script("sample.py")  # no flags at all: out/sft.pt, 4 samples
    script("reward.py", "--no-data-verify", "--steps", "2", "--batch-size", "4", "--test-reviews", "8", "--bits", "16")
    assert (tmp_path / "out" / "reward.pt").exists()  # where train.py writes it: one layout
    script("reward.py", "--no-data-verify", "--kind", "gpt", "--name", "judge", "--steps", "2", "--batch-size", "4",
           "--test-reviews", "8")  # the trunk classifier starts from out/sft.pt
    assert (tmp_path / "out" / "judge.pt").exists()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"Review {i}:", "chosen": " wonderful.", "rejected": " awful."}) + "\n")  # tokens the smoke head scores
    script("dpo.py", "--pairs", "pairs.jsonl", "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2")
    assert "--- sample 0" in script("sample.py", "--ckpt", os.path.join("out", "dpo", "dpo.pt"), "--n", "1")


# ---------------------------------------------------------------------------- the contract for bad input
# Bad input -> exit code 2, one line on stderr, no traceback, and every earlier output byte-identical.
# Checked against a finished (very short) smoke run of train.py.
SHORT = ["--preset", "smoke", "--no-data-verify", "--device", "cpu", "--sft-steps", "4", "--reward-steps", "4", "--judge-steps", "4",
         "--dpo-steps", "2", "--pft-steps", "2", "--betas", "0.1", "--dpo-eval-interval", "2"]


def train_py(args, cwd, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_imdb):
    """A finished short smoke run: (its folder, the arguments that made it)."""
    out = tmp_path_factory.mktemp("contract") / "run"
    args = SHORT + ["--data", tiny_imdb, "--out", str(out)]
    result = train_py(args, out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args


def snapshot(folder):
    return {os.path.relpath(os.path.join(root, f), folder): digest(os.path.join(root, f))
            for root, _, files in os.walk(folder) for f in files}


def assert_one_line_error(result, message):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--n-head", "3"], "--n-embd 64 must be divisible by --n-head 3"),
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--stage", "methods", "--force", "--dpo-micro-batch-size", "3"], "must be a multiple of --dpo-micro-batch-size 3"),
    (["--eval-prefixes", "100000"], "--eval-prefixes 100000 is too many for the data"),
    (["--n-prefixes", "100000"], "--n-prefixes 100000 is too many for the data"),
    (["--reward-test-reviews", "100000"], "--reward-test-reviews 100000 exceeds the 40 test reviews"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--n-embd", "1048576"], "more than this machine's"),
    (["--betas", "inf"], "every value of --betas must be finite"),
    (["--dpo-lr", "nan"], "--dpo-lr must be finite"),
    (["--betas", "0.1,0.1"], "--betas names the same value twice"),
    (["--judge-max-len", "100"], "exceeds the model's context"),
    (["--reward-bits", "40"], "bits in 8..28"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--stage", "report", "--dpo-steps", "12"], "dpo_beta0.1 is not done with these settings; run --stage methods"),
    (["--stage", "pairs", "--sft-steps", "5"], "holds no sft stage done with these settings; run --stage sft"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags_are_one_line_and_leave_the_run_untouched(finished_run, extra, message):
    out, args = finished_run
    before = snapshot(out)
    assert_one_line_error(train_py(args + extra, out.parent), message)
    assert snapshot(out) == before


@pytest.mark.parametrize("damage, message", [
    (("settings.json", b""), "settings.json is not valid JSON"),
    (("stage_times.json", b'{"sft": {"seco'), "stage_times.json is not valid JSON"),
    (("sft_point/eval.jsonl", b'{"method": "SFT"\n{"method": "SFT", "beta": null}\n'), "eval.jsonl:1: not a JSON row"),
])
def test_a_broken_run_file_is_one_line_naming_it(finished_run, damage, message):
    out, args = finished_run
    name, content = damage
    good = (out / name).read_bytes()
    (out / name).write_bytes(content)
    try:
        before = snapshot(out)
        assert_one_line_error(train_py(args, out.parent), message)
        assert snapshot(out) == before
    finally:
        (out / name).write_bytes(good)


def test_a_damaged_stage_times_json_is_said_before_a_changed_setting_removes_anything(finished_run):
    out, args = finished_run
    good = (out / "stage_times.json").read_bytes()
    (out / "stage_times.json").write_bytes(b'"x"')
    try:
        before = snapshot(out)
        assert_one_line_error(train_py(args + ["--dpo-steps", "3"], out.parent), "stage_times.json is JSON but not a table")
        assert snapshot(out) == before  # dpo_beta0.1, made with --dpo-steps 2, is still there
    finally:
        (out / "stage_times.json").write_bytes(good)


def test_out_that_is_a_file_or_under_a_file_is_refused(finished_run):
    out, args = finished_run
    for bad in (out / "sft.pt", out / "sft.pt" / "run"):
        before = snapshot(out)
        assert_one_line_error(train_py(args + ["--out", str(bad)], out.parent), "is a file, not a folder")
        assert snapshot(out) == before


def test_the_same_run_under_another_spelling_or_moved_continues(finished_run, tmp_path):
    out, args = finished_run
    result = train_py(args + ["--out", f"./{out.name}/"], out.parent)  # relative, with ./ and a trailing slash
    assert result.returncode == 0, result.stderr[-2000:]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = train_py(args + ["--out", str(moved)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("sft", "reward", "pairs", "judge", "sft_point", "preferred_ft", "dpo_beta0.1"):
        assert f"=== {name}: done already with these settings" in result.stdout
    assert read_jsonl(moved / "results.jsonl") == read_jsonl(out / "results.jsonl")


def test_a_changed_setting_redoes_exactly_what_depends_on_it(finished_run, tmp_path):
    """--dpo-lr changed: DPO and the report are redone with the new numbers; nothing else runs. The
    record of what made each artifact follows."""
    out, args = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    args = args + ["--out", str(run)]
    old_dpo = [r for r in read_jsonl(run / "results.jsonl") if r["method"] == "DPO" and r["step"] == 2]
    result = train_py(args + ["--dpo-lr", "0.01"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("sft", "reward", "pairs", "sft_point", "preferred_ft"):
        assert f"=== {name}: done already with these settings" in result.stdout
    assert "dpo_beta0.1 was made with other settings (dpo.lr 0.0001 -> 0.01): redoing it" in result.stdout
    new_dpo = [r for r in read_jsonl(run / "results.jsonl") if r["method"] == "DPO" and r["step"] == 2]
    assert len(new_dpo) == 1 and new_dpo[0]["kl"] != old_dpo[0]["kl"]
    assert json.loads((run / "settings.json").read_text())["records"]["dpo_beta0.1"]["settings"]["dpo.lr"] == 0.01
    # the judge only evaluates: a change to it redoes the judge and the evaluations, never the pairs
    result = train_py(args + ["--dpo-lr", "0.01", "--judge-steps", "5"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("sft", "reward", "pairs"):
        assert f"=== {name}: done already with these settings" in result.stdout
    assert "judge was made with other settings (judge.steps 4 -> 5)" in result.stdout
    assert "done already" not in result.stdout.split("=== judge")[1]
    # an upstream change (the pairs) redoes the pairs and removes every method made from the old ones:
    # the methods chosen run again, and the others leave no result and no time behind
    result = train_py(args + ["--dpo-lr", "0.01", "--judge-steps", "5", "--n-prefixes", "12", "--methods", "sft_point"],
                      tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "=== sft: done already" in result.stdout and "=== reward: done already" in result.stdout
    assert "pairs was made with other settings (n_prefixes 16 -> 12)" in result.stdout
    assert "done already" not in result.stdout.split("=== pairs")[1]
    assert len(read_jsonl(run / "pairs.jsonl")) == 6 * 12
    assert {r["method"] for r in read_jsonl(run / "results.jsonl")} == {"SFT"}
    times = json.loads((run / "stage_times.json").read_text())
    assert "sft_point" in times and "pairs" in times and "dpo_beta0.1" not in times and "preferred_ft" not in times


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt_not_a_full_disk(tmp_path):
    """torch.save's writer, interrupted, raises "unexpected pos" from its cleanup: the Ctrl-C is what is said."""
    def interrupted_write(f):
        f.write(b"half a checkpoint")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6501760 vs 6501652")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "sft.pt"), interrupted_write)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_stops_with_one_line_saying_how_to_continue(tmp_path, tiny_imdb):
    proc = subprocess.Popen([sys.executable] + sft_args(tiny_imdb, tmp_path / "run", ["--steps", "100000"]),
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # a shell's background job ignores SIGINT: undo that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (tmp_path / "run" / "sft.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted; rerun the same command to continue from the last checkpoint "
                                            "and the finished stages")


def test_a_full_disk_during_a_checkpoint_write_is_an_os_error_naming_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "sft.pt"
    path.write_bytes(b"the previous checkpoint")

    def write(f):  # what torch.save's writer raises when the disk fills up
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed (unexpected pos 26159808 vs 26159696)")
    with pytest.raises(OSError) as info:
        atomic_write(str(path), write)
    assert info.value.filename == str(path) and "is the disk full?" in info.value.strerror
    assert path.read_bytes() == b"the previous checkpoint"
    assert os.listdir(tmp_path) == ["sft.pt"]  # no temp file left behind


def test_run_main_prints_file_system_errors_as_one_line(capsys):
    def main():
        raise OSError(errno.EROFS, "Read-only file system", "out/sft.pt")
    with pytest.raises(SystemExit) as info:
        run_main(main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out/sft.pt: Read-only file system;") and err.count("\n") == 1


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that is gone
    (tmp_path / f"pairs.jsonl.tmp{dead.pid}").write_bytes(b"x" * 1000)
    atomic_write(str(tmp_path / "pairs.jsonl"), lambda f: f.write(b"{}\n"))
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]


def test_the_temp_file_of_a_writer_that_still_runs_is_left_to_it(tmp_path):
    """torchrun ranks tokenizing the same cache write the same paths at once: none may delete another's temp file."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"train.bin.tmp{writer.pid}").write_bytes(b"x" * 1000)
        atomic_write(str(tmp_path / "train.bin"), lambda f: f.write(b"tokens"))
        assert sorted(os.listdir(tmp_path)) == ["train.bin", f"train.bin.tmp{writer.pid}"]
    finally:
        writer.kill()
        writer.wait()


def test_a_torn_last_log_line_is_dropped_and_never_fuses_with_the_next_row(tmp_path):
    log = tmp_path / "eval.jsonl"
    append_jsonl(str(log), {"step": 0})
    with open(log, "ab") as f:
        f.write(b'{"step": 3, "rew')  # killed in the middle of an append
    assert read_jsonl(str(log)) == [{"step": 0}]
    append_jsonl(str(log), {"step": 3})
    assert read_jsonl(str(log)) == [{"step": 0}, {"step": 3}]


@pytest.mark.parametrize("junk", [{"n_layer": "two"}, {"n_head": 3}, {"bogus": 1}, {"n_embd": -8}], ids=str)
def test_a_checkpoint_with_a_junk_model_config_is_refused_naming_it(tmp_path, junk):
    path = save_tiny_checkpoint(tmp_path / "sft.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"].update(junk)
    save_checkpoint(path, ckpt)
    with pytest.raises(UserError, match="sft.pt holds an unusable model_config"):
        load_model(path)


@pytest.mark.parametrize("huge", [{"n_layer": 100_000}, {"n_embd": 2 ** 20, "n_head": 1}, {"vocab_size": 10 ** 12}], ids=str)
def test_a_model_config_far_larger_than_its_weights_is_refused_before_allocating(tmp_path, huge):
    """Built as written, each config would need terabytes; the file holds a tiny model's weights."""
    path = save_tiny_checkpoint(tmp_path / "sft.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"].update(huge)
    save_checkpoint(path, ckpt)
    with pytest.raises(UserError, match=r"sft.pt holds a model_config of at least [\d,]+ parameters but weights of only"):
        load_model(path)


def test_an_ngram_config_larger_than_its_table_is_refused(tmp_path):
    from reward import NgramClassifier, NgramConfig, load_classifier
    model = NgramClassifier(NgramConfig(bits=10))
    torch.save({"kind": "reward", "classifier": "ngram", "model": model.state_dict(),
                "model_config": {"order": 4, "bits": 28}}, tmp_path / "reward.pt")
    with pytest.raises(UserError, match="reward.pt holds a model_config of at least 268,435,456 parameters"):
        load_classifier(str(tmp_path / "reward.pt"))


def test_dpo_refuses_to_resume_after_the_pairs_file_changed(tmp_path):
    sft_path = save_tiny_checkpoint(tmp_path / "sft.pt", tiny_gpt(seed=0))
    pairs = tmp_path / "pairs.jsonl"
    row = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "prompt": "a", "chosen": "b", "rejected": "c"}
    pairs.write_text(json.dumps(row) + "\n")
    cfg = dpo.DPOConfig(sft=sft_path, pairs=str(pairs), out=str(tmp_path / "dpo"), batch_size=1, micro_batch_size=1,
                        steps=2, save_interval=1, max_length=16, device="cpu")
    dpo.train_dpo(cfg)
    pairs.write_text(json.dumps({**row, "chosen_ids": [5]}) + "\n")  # the same path, other pairs
    with pytest.raises(UserError, match="belongs to a run with different settings.*pairs: sha256:"):
        dpo.train_dpo(dataclasses.replace(cfg, steps=3))


# ---------------------------------------------------------------------------- a run folder is data, never instructions
def fake_run(out, records):
    """What train.bring_up_to_date reads of a Run: the config's out and force, the records, the paths."""
    cfg = train.TrainConfig(out=str(out))
    return type("FakeRun", (), {"cfg": cfg, "records": records, "path": lambda self, name: os.path.join(str(out), name)})()


def test_a_settings_json_naming_paths_outside_out_deletes_nothing_there(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "dpo_beta0.1").mkdir(parents=True)
    (out / "dpo_beta0.1" / "eval.jsonl").write_text("{}\n")
    outside.mkdir()
    victims = [outside / "keep.txt", tmp_path / "keep_too.txt"]
    for victim in victims:
        victim.write_text("precious")
    (out / "sft.pt").write_text("old")
    records = {"sft": {"stage": "sft", "settings": {"x": 1}, "artifacts": ["sft.pt"], "done": True},
               "dpo_beta0.1": {"stage": "methods", "settings": {}, "artifacts": [str(victims[1]), "dpo_beta0.1"], "done": True},
               "../outside": {"stage": "methods", "settings": {}, "artifacts": ["../outside/keep.txt"], "done": True}}
    run = fake_run(out, records)
    train.bring_up_to_date(run, "sft", "sft", {"x": 2}, ["sft.pt"], lambda: {})
    assert all(victim.read_text() == "precious" for victim in victims)
    assert not (out / "sft.pt").exists() and not (out / "dpo_beta0.1").exists()  # its own artifacts: redone
    assert set(run.records) == {"sft"}


def test_remove_refuses_anything_but_a_plain_name_and_unlinks_links_without_following_them(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    cfg = train.TrainConfig(out=str(out))
    for name in ("../outside", str(outside), "a/b", ".."):
        with pytest.raises(UserError, match="not a plain name"):
            train.remove(cfg, [name])
    os.symlink(outside, out / "link")
    train.remove(cfg, ["link"])
    assert not os.path.lexists(out / "link") and (outside / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("script, config", [("sft", sft.SFTConfig), ("dpo", dpo.DPOConfig), ("reward", reward.RewardConfig)])
@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", ".."])
def test_name_is_a_file_name_not_a_path(script, config, name, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(config, ["--name", name])
    assert e.value.code == 2 and "--name must be a plain file name" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["[]", "3", '"text"', '{"sft": []}', '{"sft": {"stage": "sft"}}', "[" * 100_000])
def test_a_settings_json_of_the_wrong_shape_is_a_one_line_error_naming_it(tmp_path, content):
    path = tmp_path / "settings.json"
    path.write_text(content)
    with pytest.raises(UserError, match=f"{path} is"):
        train.read_records(str(path))


@pytest.mark.parametrize("content", ["[]", '{"sft": 3}', '{"sft": {"device": "cpu"}}', '{"sft": {"seconds": -5}}',
                                     '{"sft": {"seconds": 1, "list": [1]}}'])
def test_a_stage_times_json_of_the_wrong_shape_is_a_one_line_error_naming_it(tmp_path, content):
    (tmp_path / "stage_times.json").write_text(content)
    with pytest.raises(UserError, match="stage_times.json is JSON but not a table of stage times"):
        train.read_stage_times(fake_run(tmp_path, {}))


def test_an_evaluation_row_missing_a_number_is_a_one_line_error_naming_its_line(tmp_path):
    good = {"method": "DPO", "setting": "beta=0.1", "step": 0, "n": 8, "kl": 0.0, "reward": 0.5, "reward_se": 0.1,
            "judge": 0.5, "judge_se": 0.1, "distinct": 0.9, "reference_logp": -6.0}
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "reward": "high"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(UserError, match=r"eval.jsonl:2: JSON but not an evaluation row"):
        report.read_rows(str(path))


@pytest.mark.parametrize("flags, says", [(["--ppo-epochs", "0"], "--ppo-epochs must be positive"),
                                         (["--ppo-eval-interval", "0"], "--ppo-eval-interval must be positive"),
                                         (["--kto-beta", "-1"], "--kto-beta"), (["--ipo-beta", "0"], "--ipo-beta"),
                                         (["--orpo-lam", "-1"], "--orpo-lam must be >= 0")])
def test_train_py_errors_name_the_flag_the_user_typed(flags, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_config(train.TrainConfig, ["--out", str(tmp_path)] + flags, presets=train.PRESETS, default_preset="smoke")
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_rank_without_torchrun_is_a_one_line_error_not_a_hang(monkeypatch):
    from device import setup_device
    monkeypatch.setenv("RANK", "0")
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT is not"):
        setup_device("cpu")


@pytest.mark.parametrize("state", [{"model": [], "model_config": {}}, {"model": {}, "model_config": 3}, [1, 2]])
def test_a_checkpoint_whose_parts_are_not_dicts_is_a_one_line_error(tmp_path, state):
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(UserError, match="is not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "x.pt"))


# ---------------------------------------------------------------------------- the README's commands after train.py
README_SIZES = {  # flags that only make the README's commands fit a test; no path among them
    "sample.py": ["--n", "2", "--max-new-tokens", "4", "--device", "cpu"],
    "export.py": [],
    "rescore.py": [],
    "dpo.py": ["--steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--device", "cpu"],
    "ppo.py": ["--no-data-verify", "--n-prefixes", "8", "--steps", "1", "--batch-size", "4", "--minibatch-size", "2",
               "--norm-samples", "4", "--max-new-tokens", "4", "--device", "cpu"],
}


def readme_commands_after_train():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("<!-- after-train -->\n```bash\n")[1].split("```")[0]
    return [shlex.split(line.split("#")[0]) for line in block.strip().splitlines()]


def test_every_readme_command_after_train_py_works_with_no_path_flags(finished_run, tmp_path, tiny_imdb):
    """`python train.py` (here a short smoke run in out/), then the README's next commands as written (plus only
    size flags): each finds what train.py wrote, and export.py's folder loads back with the same logits."""
    out, _ = finished_run
    shutil.copytree(out, tmp_path / "out")
    write_jsonl(tmp_path / "my_pairs.jsonl", [{"prompt": f"Review {i}:", "chosen": " wonderful.", "rejected": " awful."}
                                              for i in range(4)])
    commands = readme_commands_after_train()
    assert [c[1] for c in commands] == list(README_SIZES)
    for command in commands:
        result = subprocess.run([sys.executable, os.path.join(ROOT, command[1]), *command[2:], *README_SIZES[command[1]]], cwd=tmp_path, text=True,
                                capture_output=True, env={**os.environ, "PYTHONPATH": ROOT, "IMDB_ARCHIVE": tiny_imdb},
                                timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    policy = load_model(str(tmp_path / "out" / "dpo_beta0.1" / "dpo.pt"))
    x = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    head = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))["lm_head.weight"]  # the smoke preset's head scores 512 tokens
    with torch.no_grad():
        logits = policy.hidden_states(x) @ head.T  # the trunk's tensors: test_export.py
        assert torch.allclose(logits[..., policy.output_ids], policy(x), atol=1e-5, rtol=0)
        assert logits[..., policy.output_rows(torch.arange(50257)) < 0].max() < -9000
    assert (tmp_path / "out" / "rescored.jsonl").exists() and (tmp_path / "out" / "dpo" / "dpo.pt").exists()
    assert (tmp_path / "out" / "ppo" / "ppo.pt").exists()
