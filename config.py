"""
Config files and --key=value overrides, read into a config dataclass (train_ppo.Config) and checked
against its fields: types, the limits written beside each field (setting()), "did you mean" for a
typo. A config file is plain `name = literal` lines; nothing is executed.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import typing
from dataclasses import field

from common import UserError, shorten


def setting(default, *, choices=None, low=None, high=None, above=None, below=None, path=None,
            run=False):
    """A config field with its limits beside it: one of choices, or low <= value <= high,
    value > above, value < below. What the run does with it: path "folder" (a folder it writes
    or reads) or "source" (a path when one exists, else a hub name, "hellaswag:<split>" or a
    keyword), made absolute; run, a setting a resumed run changes as a matter of course (where
    and how long it runs, how it logs, evaluates and saves, memory), the training the same."""
    metadata = {"choices": choices, "low": low, "high": high, "above": above, "below": below,
                "path": path, "run": run or None}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def marked(config, key, value=True):
    """The names of the fields of config (a dataclass or an instance) whose setting() gave key
    this value."""
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get(key) == value)


def read_config_file(path):
    """A config file is plain `name = literal` assignments (comments and docstrings allowed);
    nothing is executed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tree = ast.parse(text, filename=path)
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: config file is not UTF-8 text") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file") from None
    except (RecursionError, MemoryError):  # the parser's stack, on deeply nested expressions
        raise UserError(f"{path}: an expression nested too deeply to read; config values are "
                        "plain literals") from None
    for node in tree.body:
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: config files hold only `name = value` lines")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, MemoryError, RecursionError):
            raise UserError(f"{path}:{node.lineno}: the value of {node.targets[0].id} must be a "
                            "literal (number, string, True/False/None)") from None
        yield node.targets[0].id, value, f"{path}:{node.lineno}"


def parse_override(arg, config_class):
    key, sep, text = arg[2:].partition("=")
    if not sep or not key:
        raise UserError(f"{arg}: command-line overrides are written --key=value")
    if typing.get_type_hints(config_class).get(key) is str:
        return key, text  # --out_dir=1e3 is the folder "1e3"
    lowered = text.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "none":
        return key, None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, text  # not a literal: check_value reports the type
    return key, value


def check_value(key, value, where, config_class):
    """Check a value against its field of config_class: the type (int -> float allowed, nothing
    else converted), then the limits written beside the field (setting())."""
    expected = typing.get_type_hints(config_class)[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # an int of 309 digits or more
            raise UserError(f"{where}: {key} must be a finite number, "
                            f"got {shorten(repr(value))}") from None
    if type(value) is not expected:
        raise UserError(f"{where}: {key} must be {expected.__name__}, got {shorten(repr(value))}")
    if expected is float and not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {shorten(repr(value))}")
    limits = next(f for f in dataclasses.fields(config_class) if f.name == key).metadata
    if "choices" in limits and value not in limits["choices"]:
        raise UserError(f"{where}: {key} must be one of {', '.join(limits['choices'])}, "
                        f"got {shorten(repr(value))}")
    low, high = limits.get("low"), limits.get("high")
    above, below = limits.get("above"), limits.get("below")
    bounds = [f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {high:g}" if high is not None else "",
              f"< {below:g}" if below is not None else ""]
    if ((low is not None and value < low) or (above is not None and value <= above)
            or (high is not None and value > high) or (below is not None and value >= below)):
        raise UserError(f"{where}: {key} must be {' and '.join(b for b in bounds if b)}, "
                        f"got {shorten(repr(value))}")
    return value


def parse_config(argv, config_class):
    """config_class from its defaults, then config files and --key=value overrides in the order
    given, each value checked against its field."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {}
    for arg in argv:
        items = ([(*parse_override(arg, config_class), shorten(arg))] if arg.startswith("--")
                 else read_config_file(arg))
        for key, value, where in items:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"{where}: unknown config key {key!r}{hint}")
            values[key] = check_value(key, value, where, config_class)
    return config_class(**values)


def limits_text(limits):
    """A setting's limits (setting()), as --help prints them."""
    if "choices" in limits:
        return "one of " + ", ".join(map(str, limits["choices"]))
    words = {"low": ">=", "above": ">", "high": "<=", "below": "<"}
    return " and ".join(f"{words[k]} {limits[k]:{'d' if isinstance(limits[k], int) else 'g'}}"
                        for k in words if k in limits)


def source_comments(config_class):
    """The comments written above and beside each field in the class's source, joined ->
    [(section or None, field name, text)]; `# ---- name` lines there head sections."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    entries, comments, section = [], [], None
    for line in inspect.getsource(config_class).splitlines()[1:]:
        code, _, comment = line.strip().partition("#")
        if not code and comment.startswith(" ---- "):
            section = comment.strip(" -")
            continue
        name = code.split(":")[0].strip()
        if name not in fields:
            comments += [comment.strip()] if comment else []
            continue
        entries.append((section, name, "; ".join(filter(None, [" ".join(comments),
                                                               comment.strip()]))))
        comments = []
    return entries


def describe(config_class):
    """--help's text: each field of config_class with its default, its limits and its comments
    (source_comments), under the sections' headings."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    lines, heading = [], None
    for section, name, text in source_comments(config_class):
        if section != heading:
            lines.append(f"\n{section}:")
            heading = section
        f = fields[name]
        limits = limits_text(f.metadata)
        lines.append(f"  --{name}={f.default!r}" + (f"  ({limits})" if limits else ""))
        lines += [f"      {row}" for row in textwrap.wrap(text, 92)]
    return "\n".join(lines)
