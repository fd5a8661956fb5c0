"""cli.py: settings from the command line, shared by train.py and eval.py.

One dataclass per script is the single source of truth: its fields are the flags, the one-line
comment after each field is the flag's --help, and the object that is validated, logged and saved
is the object that runs. Values come from, lowest first:
    the dataclass defaults < a preset (train.py: the embedded tiny model's) < --config FILE.json < flags
A nested dataclass (train.py's `loss: LossConfig`) contributes its fields as flags of their own; a
--config file may hold them flat or under its name ({"loss": {"alpha": 0.5}}).
`check(ok, flag, value, rule)` is how both scripts reject a bad value: one line that names the
flag, the value given and what is allowed, exit status 2, before any model is loaded.
No paper equation lives here.
"""
import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import sys


class SettingError(ValueError):
    """A bad setting: its message is the one line the user sees (the scripts' main() prints it and
    exits with status 2, argparse's convention; no traceback)."""
    code = 2


def exit_with(error):
    """Print a SettingError's line to stderr and exit with status 2."""
    print(error, file=sys.stderr)
    raise SystemExit(error.code) from None


def check(ok, flag, value, rule):
    """Reject a setting unless `ok`: "--flag VALUE: RULE"."""
    if not ok:
        raise SettingError(f"error: --{flag.replace('_', '-')} {value!r}: {rule}")


@functools.cache
def field_comments(cls):
    """The one-line comment of each dataclass field: `name: type = default  # comment`."""
    return dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.*)$", inspect.getsource(cls), re.M))


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _kind(f):
    """The value type of a field; `float | None` (default None: "the objective's own") gives float."""
    default = _default(f)
    if default is not None:
        return type(default)
    names = re.findall(r"\b(int|float|str|bool)\b", f.type if isinstance(f.type, str) else str(f.type))
    return {"int": int, "float": float, "str": str, "bool": bool}[names[0]] if names else str


def _flat_fields(cls):
    """[(owner class, field)] of cls, a nested dataclass field replaced by the fields of its class."""
    out = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        out += _flat_fields(type(default)) if dataclasses.is_dataclass(default) else [(cls, f)]
    return out


def parser_for(cls, description, suppress_defaults=False):
    """argparse from the dataclass (bools get --x / --no-x, lists take several values)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="JSON file of settings (flags override it)")
    for owner, f in _flat_fields(cls):
        default = _default(f)
        kind = (dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool) else
                dict(nargs="+", type=str) if isinstance(default, list) else dict(type=_kind(f)))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                            default=argparse.SUPPRESS if suppress_defaults else default,
                            help=field_comments(owner).get(f.name, "").replace("%", "%%"), **kind)
    return parser


def read_config_file(path, cls):
    """A --config JSON file as a flat dict (nested dataclass fields may sit under their field name)."""
    try:
        with open(path) as f:
            settings = json.load(f)
    except OSError as e:
        raise SettingError(f"error: --config {path!r}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise SettingError(f"error: --config {path!r}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(settings, dict):
        raise SettingError(f"error: --config {path!r}: expected a JSON object of settings")
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_default(f)) and isinstance(settings.get(f.name), dict):
            settings.update(settings.pop(f.name))
    return {k: v for k, v in settings.items() if not k.startswith("_")}  # "_comment" keys are comments


def parse(cls, argv=None, description="", preset=None):
    """(settings dict, names set on the command line or in --config): defaults < preset < file < flags."""
    values = vars(parser_for(cls, description).parse_args(argv))
    given = vars(parser_for(cls, description, suppress_defaults=True).parse_args(argv))  # flags actually typed
    config_file = values.pop("config")
    given.pop("config", None)
    from_file = read_config_file(config_file, cls) if config_file else {}
    settings = {**values, **(preset or {}), **from_file, **given}
    return settings, set(from_file) | set(given)


def build(cls, settings):
    """The dataclass from a flat dict; an unknown name is an error (a typo is never ignored)."""
    known = {f.name for _, f in _flat_fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SettingError(f"error: unknown setting(s) {unknown}; see --help")
    kwargs = {}
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            inner = {g.name: g for g in dataclasses.fields(type(default))}
            kwargs[f.name] = type(default)(**{k: _coerce(inner[k], v) for k, v in settings.items() if k in inner})
        elif f.name in settings:
            kwargs[f.name] = _coerce(f, settings[f.name])
    return cls(**kwargs)


def _coerce(f, value):
    """A --config file value of the field's type (ints where floats are expected are fine)."""
    kind, name = _kind(f), f.name
    if value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, str):
        return [value]
    raise SettingError(f"error: --{name.replace('_', '-')} {value!r}: expected a {kind.__name__}")


def describe(obj):
    """The settings of a dataclass as "name=value" words (nested ones flattened), for the log."""
    words = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        words += describe(value) if dataclasses.is_dataclass(value) else [f"{f.name}={value}"]
    return words


HUB_NAME = r"[\w.-]+/[\w.-]+"  # org/name
HUB_SOURCE = HUB_NAME + r"(:[\w.-]*){0,2}"  # a hub dataset name: org/name[:config][:split]


def check_model(flag, model):
    """A model is a local folder holding config.json, or a hub name org/name (fetched when used)."""
    if not model or re.fullmatch(HUB_NAME, model) and not os.path.exists(model.split("/")[0]):
        return
    check(os.path.isdir(model), flag, model, "no such folder (and not a hub name org/name)")
    check(os.path.isfile(os.path.join(model, "config.json")), flag, model,
          "holds no config.json: not a Hugging Face model folder")


def source_exists(source):
    """A problem source that may work: a path, "arithmetic[:split]", or a hub dataset name."""
    return bool(os.path.exists(source) or source.split(":")[0] == "arithmetic"
                or re.fullmatch(HUB_SOURCE, source))
