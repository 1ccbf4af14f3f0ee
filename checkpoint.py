"""
Files that survive a kill: every artifact is written aside and renamed into place. Checkpoints
hold the model, the optimizer, the RNG state and the step, so a resumed run continues the same
trajectory; they load with weights_only=True, so a checkpoint cannot run code.
"""
import dataclasses
import json
import os
import pickle

import torch

from cli import UserError
from device import barrier, is_main, print0
from model import GPT, GPTConfig


# ---------------------------------------------------------------------------- files
def atomic_write(path, write):
    """write(file) into path.tmp in the same folder, fsync, then rename over path: a kill at any
    moment leaves the old file or the new one, never a torn one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    if is_main():
        atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_jsonl(path, rows):
    """All rows at once, atomically (rank 0)."""
    if is_main():
        atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def append_jsonl(path, row):
    """One row at the end of a log (rank 0): logs grow line by line as a run goes."""
    if is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, checkpoint):
    if is_main():
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    barrier()


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True): a checkpoint cannot run code. Clear errors for a missing,
    truncated or foreign file, or one of another kind (e.g. a reward model where a policy is expected)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # not a pickle, or one that names code (weights_only loads no functions or classes)
        raise UserError(f"{path} is not a readable checkpoint: it is not a file of tensors and plain containers "
                        f"(anything that would run code on loading is refused); pass a checkpoint written by this project") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}); "
                        f"it may be truncated or not from this project; retrain or pass another file") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no model and model_config entries)")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, but a {kind!r} one is needed here")
    return ckpt


def load_model(path, kinds=("sft", "dpo"), dropout=0.0):
    """A GPT from one of our checkpoints (sft or dpo by default), on the CPU, dropout off by default."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") not in kinds:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint; expected one of {', '.join(kinds)}")
    model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": dropout}))
    load_state(model, ckpt["model"], path)
    return model


def load_state(module, state, path):
    """load_state_dict with an error that names the file when sizes or names differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model (different size or architecture): {str(e)[:300]}") from None


def training_checkpoint(kind, model, optimizer, cfg, step, **extra):
    """What a checkpoint holds: enough to rebuild the model and continue the same trajectory."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": dataclasses.asdict(model.config), "config": dataclasses.asdict(cfg),
            "step": step, "rng": rng_state(), **extra}


# ---------------------------------------------------------------------------- resume
def resume(path, kind, cfg, keys, model, optimizer):
    """Continue a run from its checkpoint, if there is one: restore model, optimizer and RNG state
    and return (step, checkpoint); (0, None) for a fresh run. A checkpoint of another run (its
    config differs from cfg in any of `keys`) is refused, untouched."""
    if not os.path.exists(path):
        return 0, None
    ckpt = load_checkpoint(path, kind=kind)
    check_same_run(path, ckpt["config"], cfg, keys)
    load_state(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    print0(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt


def check_same_run(path, saved, cfg, keys):
    """A file whose saved config (a dict) differs from cfg in any of `keys` belongs to another run:
    refused, untouched."""
    differs = [f"{k}: {saved.get(k)} vs {getattr(cfg, k)}" for k in keys if saved.get(k) != getattr(cfg, k)]
    if differs:
        raise UserError(f"{path} belongs to a run with a different config ({', '.join(differs)}); "
                        f"use another --out, or the same settings to continue that run")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
