import json

import pytest

import bench
from cli import UserError


def test_bench_reports_every_benchmark_with_positive_throughput_and_flops(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "smoke", "--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                "--block-size", "32", "--batch-size", "2", "--dpo-batch-size", "2", "--response-len", "8",
                "--sample-batch-size", "2", "--eval-prompts", "3", "--max-new-tokens", "4", "--warmup", "0", "--repeats", "1",
                "--out-json", str(out)])
    table = json.loads(out.read_text())
    rows = {row["benchmark"]: row for row in table["rows"]}
    assert list(rows) == ["sft", "dpo, live reference", "dpo, precomputed reference", "sample, static cache",
                          "sample, static cache, 4x batch", "evaluation (one frontier point)", "ppo step (rollout + update)"]
    assert rows["sample, static cache, 4x batch"]["config"] == "8 x 4"
    for row in rows.values():
        assert row["throughput"] > 0 and row["flops_per_unit"] > 0 and row["mfu"] is None  # no known peak on a CPU
    # 6N + 12LCT by hand: N = the embedding rows the smoke preset's head scores V*C (V = 512 of them, --output-vocab)
    # + per block 12C^2 + 13C + final LayerNorm 2C
    V, L, C, T = 512, 1, 32, 32
    N = V * C + L * (12 * C * C + 13 * C) + 2 * C
    assert rows["sft"]["flops_per_unit"] == 6 * N + 12 * L * C * T
    # a live reference adds a forward pass, a third of the policy's forward + backward
    live, precomputed = rows["dpo, live reference"], rows["dpo, precomputed reference"]
    assert live["flops_per_unit"] == pytest.approx(4 / 3 * precomputed["flops_per_unit"])
    # per pair, two rows of T tokens, the LM head (V*C weights, 6VC a position) only at the R = 8 + EOT positions
    # that predict a response token
    T_pair, R = int(precomputed["config"].split(" x ")[1]), 9
    assert precomputed["flops_per_unit"] == 2 * (T_pair * (6 * N + 12 * L * C * T_pair) - (T_pair - R) * 6 * V * C)
    # a PPO sample: L sampled tokens (2N each), two forwards over T = prompt + L tokens (4N), 2 epochs of 6N per token
    L_new = 4
    assert any(rows["ppo step (rollout + update)"]["flops_per_unit"] == L_new * 2 * N + T * 4 * N + 2 * T * 6 * N
               for T in range(2 + L_new, 8 + L_new + 1))
    # an evaluation prompt: L sampled tokens (2N + 4LC per position attended, P + 1.5 on average for a prompt
    # width P), then the policy's and reference's forward over the P + L tokens
    assert any(rows["evaluation (one frontier point)"]["flops_per_unit"] == pytest.approx(
        L_new * (2 * N + 4 * L * C * (P + (L_new - 1) / 2)) + (P + L_new) * 4 * N) for P in range(2, 9))


@pytest.mark.parametrize("kind", ["folder", "parent_is_a_file"])
def test_an_out_json_that_cannot_be_written_is_refused_before_benchmarking(tmp_path, monkeypatch, kind):
    def fail(*args, **kwargs):
        raise AssertionError("benchmarked before checking --out-json")

    monkeypatch.setattr(bench, "bench_sft", fail)
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path if kind == "folder" else tmp_path / "notes.txt" / "bench.json"
    with pytest.raises(UserError, match="--out-json"):
        bench.main(["--preset", "smoke", "--device", "cpu", "--out-json", str(out)])
