"""
The command line of every script: flags generated from a config dataclass (with presets), and
user errors printed as one line instead of a traceback.
"""
import argparse
import dataclasses
import math
import os
import sys


class UserError(Exception):
    """Bad input from the user (flags, files): printed as one line, exit code 2, no traceback."""


def run_main(main):
    """Call main(); turn user errors, file-system errors and Ctrl-C into one line and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # read-only folder, full disk, a file where a folder should be ...
        where = f"{e.filename}: {e.strerror}; fix the path or free the disk" if e.filename else str(e)
        print(f"error: {where}, then rerun the same command (finished work is kept)", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # a diverged run: say where and why, keep the last checkpoint
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to continue from the last checkpoint and the finished stages",
              file=sys.stderr)
        sys.exit(130)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_config(config_cls, argv=None, presets=None, default_preset=None, description=None):
    """argparse generated from a config dataclass: one --flag per field, defaults shown in --help.
    A field that is itself a config (a section: train.py's `dpo: DPOConfig`) gives one --SECTION-FIELD
    flag per field of its own (those marked "train_py" included, which have no flag in the file's own script),
    in a group of --help, except the fields its metadata marks "fixed"
    (the paths and shared settings the composing script fills in); a section marked "flat" gives
    --FIELD flags, its fields' names being whole flag names already (train.py's family: --simpo-gamma).
    A preset is a dict of overrides,
    by flag name with _ for - (dpo_lr), applied before the flags the user typed."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage="%(prog)s [--FLAG VALUE ...] (every flag below)")
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                            help="a named set of overrides (default: by device)")
    sections = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("train_py"):  # read only by train.py's evaluation (--dpo-eval-interval): no flag alone
            continue
        if section_of(f) is None:
            add_flag(parser, f.name, f, f.default, presets)
            continue
        default = f.default_factory()
        prefix = "" if f.metadata.get("flat") else f"{f.name}_"
        group = parser.add_argument_group(("" if prefix == "" else f"--{f.name}-*: ") + f.metadata.get("help", f.name))
        sections[f.name] = (default, prefix, [s.name for s in dataclasses.fields(default) if s.name not in f.metadata.get("fixed", ())])
        for s in dataclasses.fields(default):
            if s.name in sections[f.name][2]:
                add_flag(group, prefix + s.name, s, getattr(default, s.name), presets)
    args = parser.parse_args(argv)
    values = dict(presets[args.preset]) if presets and args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    top = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(config_cls)}}
    known = set(top) | {prefix + s for _, prefix, names in sections.values() for s in names}
    assert set(values) <= known, f"presets name no setting {sorted(set(values) - known)}"
    for name, (default, prefix, names) in sections.items():
        top[name] = dataclasses.replace(default, **{s: values[prefix + s] for s in names if prefix + s in values})
    config = config_cls(**top)
    try:
        for name, value in values.items():
            check(not isinstance(value, float) or math.isfinite(value), f"--{name.replace('_', '-')} must be finite, got {value}")
        check(0 <= getattr(config, "seed", 0) < 2**32, f"--seed must be in [0, 2^32), got {getattr(config, 'seed', 0)}")
        config.validate()
        if hasattr(config, "name"):  # OUT/NAME.pt: a name, not a path, so nothing is written outside --out
            check(is_plain_name(config.name), f"--name must be a plain file name (no / or \\), got {config.name!r}")
        if hasattr(config, "out"):
            check_out_folder(config.out)
    except ValueError as e:
        parser.error(str(e))
    return config


def section_of(f):
    """The config class of a section field (one whose default is a config dataclass), else None."""
    if f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return type(default) if dataclasses.is_dataclass(default) else None


def add_flag(parser, dest, f, default, presets):
    """One --flag for a dataclass field, its default and the presets' values in its help."""
    flag = "--" + dest.replace("_", "-")
    overrides = ", ".join(f"{name} {values[dest]}" for name, values in sorted((presets or {}).items()) if dest in values)
    help_text = f.metadata.get("help", " ") + f" (default: {default}" + (f"; preset {overrides})" if overrides else ")")
    if f.type in (bool, "bool"):
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
        if default is None:
            kind = str
        parser.add_argument(flag, dest=dest, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def check_out_folder(path):
    """--out must be a folder this process can write (or create): said up front, before any work (ValueError)."""
    existing = path
    while not os.path.exists(existing):  # the nearest folder that exists must let us create the rest
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise ValueError(f"--out {path}: {existing} is a file, not a folder; pass a folder path")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"--out {path}: {existing} is not writable; pass a folder you can write to")


def is_plain_name(name):
    """A file name with no path in it: nothing joined to a folder with it can leave the folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0", os.sep))


def check(condition, message):
    """Config validation: raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)
