"""
Files that survive a kill: every artifact is written aside and renamed into place. Checkpoints
hold the model, the optimizer, the RNG state and the step, so a resumed run continues the same
trajectory; they load with weights_only=True, so a checkpoint cannot run code.
"""
import contextlib
import dataclasses
import errno
import functools
import glob
import hashlib
import json
import os
import pickle

import torch

from cli import UserError
from device import barrier, is_main, print0
from model import GPT, GPTConfig
from pretrained import GPT2_SIZES, load_gpt2


# ---------------------------------------------------------------------------- files
def atomic_write(path, write):
    """write(file) into path.tmpPID in the same folder, fsync, then rename over path: a kill at any
    moment leaves the old file or the new one, never a torn one. A temp file a killed write left
    behind is removed by the next write of the same path; one whose writer still runs (torchrun
    ranks tokenizing the same cache at once) is left to it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for stray in glob.glob(glob.escape(path) + ".tmp*"):
        pid = stray[len(path) + len(".tmp"):]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # another process may clean it up first
                os.remove(stray)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as e:  # torch.save's writer reports a full disk as "unexpected pos ..."
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C mid-write: the writer's cleanup raised this one
            raise e.__context__ from None
        raise OSError(errno.ENOSPC, f"could not write it ({e}); is the disk full?", path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: no signal sent, only the check that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def save_json(path, obj):
    if is_main():
        atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path, valid=None, what="the file this project writes there"):
    """A JSON file this project wrote; a torn, foreign or reshaped one is a one-line error naming it.
    valid(obj) -> bool checks its shape (what: a few words for the error)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:80]}); it may be torn by a crash or edited by hand: "
                        f"delete it to rebuild it (or restore it)") from None
    if valid is not None and not valid(obj):
        raise UserError(f"{path} is JSON but not {what}; it may be edited by hand: delete it to rebuild it (or restore it)")
    return obj


def write_jsonl(path, rows):
    """All rows at once, atomically (rank 0)."""
    if is_main():
        atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def append_jsonl(path, *rows):
    """Rows at the end of a log (rank 0), in one write: logs grow line by line as a run goes. A torn last
    line (a kill in the middle of an append) is cut off first, so it never fuses with a new row."""
    if is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(max(0, size - 65536))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)  # rfind -1 -> the whole (one-line) tail
            f.write("".join(json.dumps(row) + "\n" for row in rows).encode())


def read_jsonl(path, valid=None, what="a row this project writes there"):
    """The rows of a JSONL file. A torn last line (a kill in the middle of an append) is dropped:
    the run rewrites that row when it continues. A bad line before the last, or a row that fails
    valid(row) -> bool, is an error naming it."""
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not a JSON row ({str(e)[:80]}); delete the file to rebuild it") from None
            continue
        if valid is not None and not valid(rows[-1]):
            raise UserError(f"{path}:{number}: JSON but not {what}; delete the file to rebuild it")
    return rows


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
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("model_config"), dict):
        raise UserError(f"{path} is not a checkpoint of this project (no model and model_config dicts)")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, but a {kind!r} one is needed here")
    return ckpt


def load_model(path, kinds=("sft", "dpo", "ppo", "sppo"), dropout=0.0):
    """A GPT on the CPU, dropout off by default: the model of one of our checkpoints (sft, dpo, ppo or sppo
    by default), or GPT-2 weights (pretrained.load_gpt2): a published name (gpt2 ... gpt2-xl), a folder
    written by save_pretrained or a .safetensors file, whose vocabulary must cover GPT-2's tokenizer."""
    if path in GPT2_SIZES or os.path.isdir(path) or path.endswith(".safetensors"):
        try:
            model = load_gpt2(path, dropout=dropout)
        except ValueError as e:
            raise UserError(str(e)) from None
        if model.config.vocab_size < GPTConfig.vocab_size:  # every id of GPT-2's tokenizer needs an embedding row
            raise UserError(f"{path}: its vocabulary has {model.config.vocab_size} tokens, fewer than the 50,257 of "
                            f"GPT-2's tokenizer, which this project uses; pass a model trained with GPT-2's BPE")
        return model
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}; pass one of this project's checkpoints (.pt), a save_pretrained "
                        f"GPT-2 folder, a .safetensors file or a published GPT-2 name ({', '.join(GPT2_SIZES)})")
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") not in kinds:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint; expected one of {', '.join(kinds)}")
    model = GPT(model_config(ckpt, path, dropout))
    load_state(model, ckpt["model"], path)
    ids = model.output_ids
    if ids is not None and not (bool((ids[1:] > ids[:-1]).all()) and 0 <= int(ids[0]) and int(ids[-1]) < model.config.vocab_size):
        raise UserError(f"{path}: the tokens its head scores (output_ids) are not distinct GPT-2 ids in increasing order; "
                        f"it is damaged or not from this project")
    return model


def model_config(ckpt, path, dropout=0.0):
    """The GPTConfig a checkpoint stores, checked: a junk one is a one-line error naming the file, and so
    is one describing a model larger than the weights the file holds, refused before any is allocated."""
    try:
        config = GPTConfig(**{**ckpt["model_config"], "dropout": dropout})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} holds an unusable model_config ({e}); it is damaged or not from this project") from None
    c = config
    at_least = c.n_layer * 12 * c.n_embd ** 2 + (c.vocab_size + c.block_size) * c.n_embd  # fewer than the GPT's parameters
    check_size(path, at_least, ckpt["model"])
    return config


def check_size(path, parameters, state):
    """A model of `parameters` numbers cannot come from a state holding fewer: a lying config is refused
    by its size before a model of that size is allocated."""
    held = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    if parameters > held:
        raise UserError(f"{path} holds a model_config of at least {parameters:,} parameters but weights of only "
                        f"{held:,} numbers; it is damaged or not from this project")


def load_state(module, state, path):
    """load_state_dict with an error that names the file when sizes or names differ."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model (different size or architecture): {str(e)[:300]}") from None


def training_checkpoint(kind, model, optimizer, cfg, keys, step, **extra):
    """What a checkpoint holds: enough to rebuild the model and continue the same trajectory, and
    the identity of its run (the settings `keys` of cfg) that resume checks."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": dataclasses.asdict(model.config), "config": dataclasses.asdict(cfg),
            "run": run_identity(cfg, keys), "step": step, "rng": rng_state(), **extra}


# ---------------------------------------------------------------------------- resume
def resume(path, kind, cfg, keys, model, optimizer):
    """Continue a run from its checkpoint, if there is one: restore model, optimizer and RNG state
    and return (step, checkpoint); (0, None) for a fresh run. A checkpoint of another run (its
    run_identity differs from cfg's over `keys`) is refused, untouched."""
    if not os.path.exists(path):
        return 0, None
    ckpt = load_checkpoint(path, kind=kind)
    check_same_run(path, ckpt.get("run", {}), run_identity(cfg, keys))
    load_state(model, ckpt["model"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    print0(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt


def run_identity(cfg, keys):
    """The settings `keys` of cfg that define a run. A setting that names a file (the SFT checkpoint
    DPO starts from, the preference pairs) stands for the file's contents: a run folder that was
    moved or copied, or named by another spelling of its path, is the same run; a file changed
    under the same name is not."""
    values = {k: getattr(cfg, k) for k in keys}
    return {k: file_digest(v) if isinstance(v, str) and os.path.isfile(v) else v for k, v in values.items()}


def file_digest(path):
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path, size, mtime_ns):  # hashed once per version of the file (size and mtime in the key)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def check_same_run(path, saved, identity):
    """A file whose saved run identity (a dict) differs from this run's is another run's: refused, untouched."""
    differs = [f"{k}: {saved.get(k)} vs {v}" for k, v in identity.items() if saved.get(k) != v]
    if differs:
        raise UserError(f"{path} belongs to a run with different settings ({', '.join(differs)}); "
                        f"use another --out, or the same settings (and input files) to continue that run")


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
