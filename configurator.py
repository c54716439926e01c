"""
Settings from a config file and the command line, nanoGPT style:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is plain Python that assigns settings. `--key=value` overrides are parsed
with ast.literal_eval (a bare word stays a string). Unlike nanoGPT's exec of this file
into the caller, configure() returns the new settings and the caller does
`globals().update(...)` at module level, so nothing is silently lost inside a function;
unknown keys and wrong types are errors, not surprises three hours into a run.
"""
import argparse
import ast
import difflib
import os
import sys


from gpt_trainer.errors import ConfigError, UserError, install_error_hook  # noqa: F401  (the scripts' errors)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that use it: a bad option is a UserError like any other."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def type_ok(default, value):
    if default is None:
        return True  # a None default may be overridden by anything
    if isinstance(default, bool) or isinstance(value, bool):
        # 'auto' settings also take True/False; bools never pass as ints or the reverse
        return isinstance(value, bool) and (isinstance(default, bool) or default == "auto")
    if isinstance(default, float):
        return isinstance(value, (int, float))  # an int is fine where a float is expected
    if default == "auto":
        return isinstance(value, (str, int, float))
    return isinstance(value, type(default))


def check_key(settings, key, origin):
    if key not in settings:
        close = difflib.get_close_matches(key, list(settings), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for the settings"
        raise ConfigError(f"{origin}: unknown setting {key!r}{hint}")


def check_type(settings, key, value, origin):
    default = settings[key]
    if not type_ok(default, value):
        raise ConfigError(f"{origin}: {key}={value!r} is a {type(value).__name__}, expected a "
                          f"{type(default).__name__} like the default {default!r}")


def exec_config_file(path, settings):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (settings are passed as --key=value)")
    scope = dict(settings)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          f"save the config file as UTF-8")
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}")
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        raise ConfigError(f"{path}: {type(e).__name__}: {e}")
    updates = {}
    for key, value in scope.items():
        if key.startswith("_") or key in ("__builtins__",) or type(value).__name__ == "module":
            continue
        if key in settings and value is settings[key]:
            continue
        if callable(value):
            continue  # helper functions a config file defines for itself
        check_key(settings, key, path)
        check_type(settings, key, value, path)
        updates[key] = value
    return updates


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # --dataset=shakespeare_char: a bare word is a string


def setting_comments(source_file):
    """{name: comment} from lines like `name = value  # comment` in the script's source."""
    comments = {}
    with open(source_file) as f:
        for line in f:
            if "=" in line and "#" in line and not line.startswith((" ", "#")):
                name = line.split("=", 1)[0].strip()
                if name.isidentifier():
                    comments[name] = line.split("#", 1)[1].strip()
    return comments


def print_help(settings, source_file):
    comments = setting_comments(source_file)
    print(f"usage: python {os.path.basename(source_file)} [config_file.py ...] [--key=value ...]\n")
    for key, value in settings.items():
        print(f"  --{key}={value!r}".ljust(40) + f"  {comments.get(key, '')}")


def configure(settings, argv, source_file, given=None):
    """settings updated by the config files and --key=value overrides in argv, in order; the
    keys they assign are added to the set `given` when one is passed."""
    settings = dict(settings)
    given = set() if given is None else given
    if any(arg in ("-h", "--help") for arg in argv):
        print_help(settings, source_file)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            updates = exec_config_file(arg, settings)
            settings.update(updates)
            given.update(updates)
            continue
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --key=value")
        key, text = arg[2:].split("=", 1)
        check_key(settings, key, "command line")
        value = parse_value(text)
        check_type(settings, key, value, "command line")
        settings[key] = value
        given.add(key)
    return settings


# Rules for check_settings: (test, what a valid value is). The type is checked by configure()
# already (against the default's); a rule checks the value.
ANY = (lambda v: True, "any value of the default's type")


def one_of(*choices):
    return (lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def finite(v):
    return v == v and v not in (float("inf"), float("-inf"))  # 1e999 parses as inf


def at_least(low):
    return (lambda v: v >= low and finite(v), f">= {low} and finite")


def in_range(low, high):
    """low <= v < high"""
    return (lambda v: low <= v < high, f"in [{low}, {high})")


def check_settings(settings, rules, source_file, relations=()):
    """Every setting against its rule in `rules`, then the rules between settings
    (relations: (test(settings), message(settings))), before anything is created or computed."""
    missing = sorted(set(settings) - set(rules))
    if missing:  # a bug of ours, not the user's: a setting was added without a rule
        raise KeyError(f"{source_file}: no rule for setting(s) {missing}")
    for key, (ok, expected) in rules.items():
        if not ok(settings[key]):
            raise ConfigError(f"{key}={settings[key]!r} is not valid: it must be {expected}")
    for ok, message in relations:
        if not ok(settings):
            raise ConfigError(message(settings))

