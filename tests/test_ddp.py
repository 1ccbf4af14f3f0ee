"""Data parallel with torchrun: 2 CPU processes (gloo) must follow the same trajectory as one
process that sees the same global batch."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from checkpoint import read_jsonl
from conftest import save_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533"] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    args = [os.path.join(ROOT, args[0])] + args[1:]
    result = subprocess.run(launcher + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(log_path):
    return [row["loss"] for row in read_jsonl(log_path) if "loss" in row]


def test_dpo_with_two_processes_matches_one_process(tmp_path):
    save_tiny_checkpoint(tmp_path / "sft.pt")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Review {i}:", "chosen": " a fine, warm film" + " yes" * (i % 3),
                                "rejected": " dull" + " no" * (i % 4)}) + "\n")
    dpo_args = ["dpo.py", "--sft", str(tmp_path / "sft.pt"), "--pairs", str(tmp_path / "pairs.jsonl"),
                   "--batch-size", "8", "--micro-batch-size", "4", "--steps", "4", "--log-interval", "1",
                   "--optimizer", "adamw", "--lr", "1e-2", "--warmup-steps", "1", "--device", "cpu"]
    run(dpo_args + ["--out", str(tmp_path / "single")], ROOT)
    run(dpo_args + ["--out", str(tmp_path / "ddp")], ROOT, nproc=2)
    single, ddp = losses(tmp_path / "single" / "dpo_log.jsonl"), losses(tmp_path / "ddp" / "dpo_log.jsonl")
    assert len(single) == len(ddp) == 4
    assert single[-1] < single[0] - 1e-3  # the run actually moved, so matching is not trivial
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)
    a = torch.load(tmp_path / "single" / "dpo.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "dpo.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4)  # Adam magnifies rounding of near-zero grads


def test_sft_with_two_processes_matches_one_process(tmp_path):
    archive = tmp_path / "imdb.tar.gz"
    words = "the film was a great and moving story with fine acting but a weak and dull ending".split()
    with tarfile.open(archive, "w:gz") as tar:
        for split, label, n in (("train", "pos", 30), ("train", "neg", 30), ("test", "pos", 10), ("test", "neg", 10),
                                ("train", "unsup", 20)):
            for i in range(n):
                text = " ".join(words[(i + j * 3) % len(words)] for j in range(40)).encode()
                info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_7.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    args = ["sft.py", "--preset", "smoke", "--data", str(archive), "--no-data-verify", "--steps", "3",
            "--log-interval", "1", "--eval-interval", "3", "--batch-size", "4", "--n-embd", "32", "--n-layer", "1",
            "--block-size", "32", "--device", "cpu", "--seed", "3"]
    run(args + ["--out", str(tmp_path / "single")], tmp_path)
    run(args + ["--out", str(tmp_path / "ddp")], tmp_path, nproc=2)
    single, ddp = losses(tmp_path / "single" / "sft_log.jsonl"), losses(tmp_path / "ddp" / "sft_log.jsonl")
    assert len(single) == len(ddp) == 3
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)
