"""Config: dataclass trees filled from YAML defaults and `--section.key value` flags.

    medgpt sft configs/tiny/sft.yaml --train.max_steps 2 --finetune.type lora

Rules (the contract every command relies on):
- YAML gives defaults, flags win; both are type-checked against the dataclass field types.
- An unknown key is an error that names the nearest valid key.
- Every field carries its doc in `metadata["help"]` (see `arg`); `--help` prints them.
- Numbers carry their valid range (`arg(4, "...", min=1)`); a value outside it is an error naming the key, the
  file it came from (if any) and the range.
- The resolved config is saved beside the outputs with `save_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from medgpt.utils import MedGPTError, atomic_write

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", "~", ""}


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, min: float | None = None,
        max: float | None = None, above: float | None = None, below: float | None = None,
        unbounded: bool = False, whole: bool = False) -> Any:
    """A config field with its documentation. Mutable defaults go through `factory`.

    A number states its valid range, checked wherever a value is read (YAML or flag): `min`/`max` inclusive,
    `above`/`below` exclusive, e.g. `arg(0.9, "...", above=0, max=1)`. A number with no natural range says
    `unbounded=True`, so that a forgotten range is caught by the tests rather than by a user's traceback.
    A list of texts that may hold commas says `whole=True`: its bare command-line arguments are items as they are
    (a list of paths splits them on commas).
    """
    meta: dict[str, Any] = {"help": help}
    bounds = {k: v for k, v in (("min", min), ("above", above), ("max", max), ("below", below)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if unbounded:
        meta["unbounded"] = True
    if whole:
        meta["whole"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str = "") -> Any:
    """A nested group of fields (`--model.*`, `--train.*`, ...)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------- introspection

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted_key, field, type) for every leaf field of a config class."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def leaf_keys(cls: type) -> list[str]:
    return [k for k, _, _ in iter_fields(cls)]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or none)"
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])} (comma-separated)"
    if origin is dict:
        return "mapping (k=v,k2=v2)"
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------- coercion

def _invalid(value: Any, tp: Any, key: str, why: str = "") -> MedGPTError:
    return MedGPTError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}{why}. "
                       f"Fix the value in your YAML file or on the command line (--{key} VALUE).")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a flag string to `tp`, or raise a MedGPTError naming the key."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (list, dict) and isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        # A nested value on the command line as YAML/JSON flow: --pt.phases '[{name: a, steps: 10, ...}]'
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise _invalid(value, tp, key, f" (it looks like YAML flow syntax but does not parse: "
                                           f"{str(e).splitlines()[0]})") from None
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if origin is list:
        return _coerce_list(value, tp, key)
    if origin is dict:
        return _coerce_dict(value, tp, key)
    if tp in _SCALARS:
        return _SCALARS[tp](value, tp, key)
    raise _invalid(value, tp, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return coerce(value, a, key)
        except MedGPTError:
            pass
    raise _invalid(value, tp, key)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = get_args(tp)
    for c in choices:
        if value == c or (isinstance(value, str) and str(c) == value.strip()):
            return c
    raise MedGPTError(f"config key '{key}': {value!r} is not one of: {', '.join(map(str, choices))}. "
                      f"Fix the value in your YAML file or on the command line (--{key} VALUE).")


def _coerce_list(value: Any, tp: Any, key: str) -> list:
    (item_tp,) = get_args(tp)
    if value is None:
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    return [coerce(v, item_tp, key) for v in items]


def _coerce_dict(value: Any, tp: Any, key: str) -> dict:
    k_tp, v_tp = get_args(tp)
    if value is None:
        return {}
    if isinstance(value, str):
        out = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            if "=" not in part:
                raise _invalid(value, tp, key, " (expected k=v pairs separated by commas)")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        value = out
    if not isinstance(value, dict):
        raise _invalid(value, tp, key)
    return {coerce(k, k_tp, key): coerce(v, v_tp, key) for k, v in value.items()}


def _coerce_bool(value: Any, tp: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _invalid(value, tp, key, " (use true or false)")


def _coerce_int(value: Any, tp: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _invalid(value, tp, key)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                raise _invalid(value, tp, key) from None
            if f.is_integer():
                return int(f)
    raise _invalid(value, tp, key)


def _coerce_float(value: Any, tp: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _invalid(value, tp, key)


def _coerce_str(value: Any, tp: Any, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _invalid(value, tp, key)


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


# ----------------------------------------------------------------------------- ranges

_RULES = {"min": ("at least", lambda v, b: v >= b), "max": ("at most", lambda v, b: v <= b),
          "above": ("above", lambda v, b: v > b), "below": ("below", lambda v, b: v < b)}


def describe_range(bounds: dict[str, float]) -> str:
    """{'min': 0, 'below': 1} -> 'at least 0 and below 1'."""
    return " and ".join(f"{_RULES[k][0]} {v if isinstance(v, int) else f'{v:g}'}" for k, v in bounds.items())


def check_range(value: Any, f: dataclasses.Field, key: str, raw: Any, where: str | None = None) -> None:
    """Raise a MedGPTError when a coerced number (or a list item) is outside the field's declared range.

    `where` is "in FILE" for a YAML value, None for a flag; `raw` is the value as the user wrote it."""
    bounds = f.metadata.get("range")
    items = value if isinstance(value, list) else [value]
    if not bounds or not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return
    if all(_RULES[k][1](v, b) for v in items for k, b in bounds.items()):
        return
    doc = f.metadata.get("help", "").split(". ")[0].rstrip(".")
    first = doc.split(" ")[0]
    if first[1:] == first[1:].lower():  # "Per-device batch size" -> "per-device ...", but "LoRA rank" stays
        doc = doc[:1].lower() + doc[1:]
    doc = f" ({doc})" if doc else ""
    if where:
        raise MedGPTError(f"{key}: {raw} {where}: must be {describe_range(bounds)}{doc}. "
                          f"Fix the value in that file (or override it with --{key} VALUE).")
    raise MedGPTError(f"--{key} {raw}: must be {describe_range(bounds)}{doc}. Pass a value in that range.")


# ----------------------------------------------------------------------------- building

def _unknown(key: str, cls: type, source: str) -> MedGPTError:
    keys = leaf_keys(cls)
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    near = difflib.get_close_matches(key, keys + sections, n=1, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return MedGPTError(
        f"unknown config key '{key}' ({source}).{hint} "
        f"Run with --help to list every valid key."
    )


def flatten(d: dict, mapping_keys: set[str], prefix: str = "") -> dict[str, Any]:
    """{'train': {'max_steps': 2}} and {'train.max_steps': 2} alike -> {'train.max_steps': 2}; mapping-typed
    fields (in mapping_keys) stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in mapping_keys:
            out.update(flatten(v, mapping_keys, key + "."))
        else:
            out[key] = v
    return out


def _is_mapping(tp: Any) -> bool:
    if get_origin(tp) in (Union, types.UnionType):
        return any(_is_mapping(a) for a in get_args(tp))
    return get_origin(tp) is dict


def build(cls: type, values: dict[str, Any], source: dict[str, str] | None = None):
    """Instantiate `cls` from flat dotted `values`; unknown keys and bad types raise MedGPTError."""
    source = source or {}
    types_by_key = {k: tp for k, _, tp in iter_fields(cls)}
    for key in values:
        if key not in types_by_key:
            raise _unknown(key, cls, source.get(key, "from the command line"))

    def make(c: type, prefix: str, base=None):
        hints = _hints(c)
        kwargs = {}
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                # A section whose factory shapes its defaults (not plain `section(cls)`) keeps them under overrides.
                shaped = f.default_factory() if f.default_factory not in (dataclasses.MISSING, tp) else None
                kwargs[f.name] = make(tp, key + ".", shaped)
            elif key in values:
                kwargs[f.name] = coerce(values[key], tp, key)
                check_range(kwargs[f.name], f, key, values[key], source.get(key))
        try:
            made = dataclasses.replace(base, **kwargs) if base is not None else c(**kwargs)
        except TypeError as e:  # a required field left unset
            missing = [f"{prefix}{f.name}" for f in dataclasses.fields(c)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       and f.name not in kwargs]
            raise MedGPTError(f"missing required config key(s): {', '.join(missing) or e}.") from None
        post = getattr(made, "validate", None)  # rules across fields of one group (num_epochs vs max_steps)
        if callable(post):
            post()
        return made

    return make(cls, "")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MedGPTError(f"config file not found: {p}. Check the path, or run without it to use the defaults.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise MedGPTError(f"{where}: this config file is not valid YAML ({getattr(e, 'problem', e)}). "
                          f"Fix the syntax at that line.") from None
    except UnicodeDecodeError:
        raise MedGPTError(f"{p}: a config file must be UTF-8 text.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MedGPTError(f"{p}: a config file must be a mapping of keys to values (key: value), "
                          f"not a {type(data).__name__}.")
    return data


def parse_argv(cls: type, argv: list[str], positional: str | None = None):
    """Parse `[config.yaml] [POSITIONAL...] [--a.b value | --a.b=value | --flag]` into a `cls`.

    `positional` names the list field that bare (non-YAML) arguments fill, e.g. `data.train_files`.
    """
    types_by_key = {k: tp for k, _, tp in iter_fields(cls)}
    whole = {k for k, f, _ in iter_fields(cls) if f.metadata.get("whole")}
    mapping_keys = {k for k, tp in types_by_key.items() if _is_mapping(tp)}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    flags: dict[str, Any] = {}
    bare: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            key, eq, val = tok[2:].partition("=")
            key = key.replace("-", "_") if key not in types_by_key else key
            if not eq:
                tp = types_by_key.get(key)
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if tp is bool and (nxt is None or nxt.startswith("--") or nxt.lower() not in _TRUE | _FALSE):
                    val = "true"
                elif nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                    if tp is None:
                        raise _unknown(key, cls, "from the command line")
                    raise MedGPTError(f"flag --{key} needs a value ({_type_name(tp)}).")
                else:
                    val = nxt
                    i += 1
            flags[key] = val
        else:
            bare.append(tok)
        i += 1

    for tok in bare:
        if tok.endswith((".yaml", ".yml")) and not values:  # the first YAML file is the config
            for k, v in flatten(load_yaml(tok), mapping_keys).items():
                values[k] = v
                source[k] = f"in {tok}"
        elif positional in whole:
            prev = flags.get(positional)
            flags[positional] = [*(prev if isinstance(prev, list) else [prev] if prev else []), tok]
        elif positional:
            prev = flags.get(positional)
            flags[positional] = f"{prev},{tok}" if prev else tok
        else:
            raise MedGPTError(f"unexpected argument '{tok}'. Options are given as --section.key VALUE; "
                              f"run with --help to list them.")
    values.update(flags)
    for key in flags:  # a flag wins over the YAML value, so errors about it must not name the file
        source.pop(key, None)
    return build(cls, values, source)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); it reloads to the same values."""
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(cfg), f, allow_unicode=True, sort_keys=False)


def format_help(cls: type, command: str, doc: str = "") -> str:
    lines = [f"usage: medgpt {command} [config.yaml] [--section.key VALUE ...]", ""]
    if doc:
        lines += [doc.strip(), ""]
    width = max((len(k) for k in leaf_keys(cls)), default=10) + 2
    try:  # the defaults a command really gets: a section's factory may set its own (pt: lr_scheduler auto)
        resolved = dataclasses.asdict(cls())
    except TypeError:  # required fields: fall back to each field's own default
        resolved = None
    current = None
    for key, f, tp in iter_fields(cls):
        sec = key.rsplit(".", 1)[0] if "." in key else ""
        if sec != current:
            current = sec
            lines.append(f"{sec}:" if sec else "options:")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        if resolved is not None:
            default = resolved
            for part in key.split("."):
                default = default[part]
        help_ = f.metadata.get("help", "")
        bounds = f.metadata.get("range")
        kind = _type_name(tp) + (f", {describe_range(bounds)}" if bounds else "")
        lines.append(f"  --{key:<{width}} {help_} [{kind}; default: {default!r}]")
    return "\n".join(lines)
