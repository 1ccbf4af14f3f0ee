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
    A preset is a dict of overrides applied before the flags the user typed."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                            help="a named set of overrides (default: by device)")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        overrides = ", ".join(f"{name} {values[f.name]}" for name, values in sorted((presets or {}).items()) if f.name in values)
        help_text = f.metadata.get("help", " ") + f" (default: {default}" + (f"; preset {overrides})" if overrides else ")")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            if default is None:
                kind = str
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    args = parser.parse_args(argv)
    values = dict(presets[args.preset]) if presets and args.preset else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "preset"})
    config = config_cls(**values)
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
