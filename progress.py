"""
Progress of long work: one line per interval with the step, the metrics, the rate, MFU where the
GPU's peak is known, and the time left; the same numbers go to a JSON-lines log.
"""
import time

from checkpoint import append_jsonl
from device import is_main


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One line per log interval (step/total, metrics, rate, ETA), plus the same numbers as JSON lines."""

    def __init__(self, name, total, log_path=None, unit="tok", start_step=0):
        self.name, self.total, self.log_path, self.unit = name, total, log_path, unit
        self.start_step = start_step
        self.t0 = self.last_t = time.time()
        self.count = 0  # units (tokens, pairs) since the last line

    def add(self, units):
        """Count the units (tokens, pairs) one step processed."""
        self.count += units

    def line(self, step, metrics, show=None, peak_flops=None, flops_per_unit=None):
        """Print one line (the metrics named in `show`, default all) and record all of them.
        The rate (and MFU, where the peak is known) is measured since the previous line; the ETA over
        the whole stage so far, so the evaluations between lines count in it."""
        if not is_main():
            return
        now = time.time()
        rate = self.count / max(now - self.last_t, 1e-9)
        steps_per_s = (step - self.start_step) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / max(steps_per_s, 1e-9)
        row = {"step": step, **metrics, f"{self.unit}_per_s": rate, "time": now - self.t0}
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in metrics.items() if show is None or k in show)
        mfu = ""
        if peak_flops and flops_per_unit:
            row["mfu"] = rate * flops_per_unit / peak_flops
            mfu = f" | mfu {row['mfu']:.1%}"
        print(f"{self.name} step {step}/{self.total} | {shown} | {_si(rate)} {self.unit}/s{mfu} | eta {format_seconds(eta)}", flush=True)
        self.record(row)
        self.last_t, self.count = now, 0

    def record(self, row):
        if self.log_path:
            append_jsonl(self.log_path, row)


def _si(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"
