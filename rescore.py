"""
Re-score a finished run's samples with another classifier: every completions.jsonl a train.py run wrote
(one row per evaluation prefix, at every evaluation of every method run) scored again, so a run scored
by our n-gram reward can be read on another scale after the fact, e.g. the paper's.

    python rescore.py --run out --scorer out/judge.pt            # the second judge as the reward
    python rescore.py --run out --scorer other_run/reward.pt     # another run's ground truth

Prints each point's mean under the scorer (± one standard error over the prefixes) beside the reward it
was trained and plotted with, and writes OUT/rescored.jsonl: one row per point, with scorer_reward and
scorer_reward_se added.
"""
import glob
import os
from dataclasses import dataclass, field

import numpy as np

from checkpoint import read_jsonl, write_jsonl
from cli import UserError, check, parse_config, run_main
from evaluate import shown_kl, standard_error
from reward import load_classifier


@dataclass
class RescoreConfig:
    run: str = field(default="out", metadata={"help": "a train.py run folder (its method runs' completions.jsonl)"})
    scorer: str = field(default="out/judge.pt", metadata={"help": "a classifier checkpoint: r(x, y) = P(positive | x + y)"})
    batch_size: int = field(default=64, metadata={"help": "texts scored at a time"})

    def validate(self):
        check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")


def read_completions(path):
    """The rows of a completions.jsonl, the last one kept for each (method, setting, step, index): an
    evaluation redone after a kill appends its rows again."""
    rows = read_jsonl(path, valid=lambda row: isinstance(row, dict) and {"method", "setting", "step", "index", "prompt_ids",
                                                                          "completion_ids", "reward", "kl"} <= set(row),
                      what="a completion row")
    return list({(r["method"], r["setting"], r["step"], r["index"]): r for r in rows}.values())


def rescore(rows, scorer, batch_size=64):
    """One point per (method, setting, step) of completion rows: n, the original reward and KL, and the
    scorer's mean reward with its standard error over the prefixes."""
    texts = [row["prompt_ids"] + row["completion_ids"] for row in rows]
    scores = [s for i in range(0, len(texts), batch_size) for s in scorer.score(texts[i:i + batch_size]).tolist()]
    groups = {}
    for row, score in zip(rows, scores):
        groups.setdefault((row["method"], row["setting"], row["step"]), []).append((row, score))
    out = []
    for (method, setting, step), group in groups.items():
        scored = [score for _, score in group]
        out.append({"method": method, "setting": setting, "step": step, "n": len(group),
                    "kl": float(np.mean([row["kl"] for row, _ in group])), "reward": float(np.mean([row["reward"] for row, _ in group])),
                    "scorer_reward": float(np.mean(scored)), "scorer_reward_se": standard_error(scored)})
    return out


def main():
    cfg = parse_config(RescoreConfig, description=__doc__)
    files = sorted(glob.glob(os.path.join(glob.escape(cfg.run), "*", "completions.jsonl")))
    if not files:
        raise UserError(f"{cfg.run} holds no method run with a completions.jsonl; pass --run of a finished train.py run")
    scorer = load_classifier(cfg.scorer)
    points = [point for path in files for point in rescore(read_completions(path), scorer, cfg.batch_size)]
    print(f"| method | setting | step | n | KL | reward | {os.path.basename(cfg.scorer)} |\n|---|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['method']} | {p['setting']} | {p['step']} | {p['n']} | {shown_kl(p['kl'], 2)} | {p['reward']:.3f} | "
              f"{p['scorer_reward']:.3f} ± {p['scorer_reward_se']:.3f} |")
    write_jsonl(os.path.join(cfg.run, "rescored.jsonl"), points)
    print(f"wrote {os.path.join(cfg.run, 'rescored.jsonl')}")


if __name__ == "__main__":
    run_main(main)
