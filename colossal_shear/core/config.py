"""One typed configuration system for every CLI: a dataclass per CLI is the single source of truth for each option's
name, type, default, choices and help. argparse flags, YAML files (`--config FILE`) and the flag tables in
docs/cli.md are all derived from it, and values from both sources are converted to the field's type, so
`lr: 1e-3` (a string to PyYAML) or `max_steps: "3"` work, and a wrong value or unknown key is one line naming it.

Precedence: field defaults < `--config FILE.yaml` < flags given on the command line. A nested dataclass field
(`option_section`) is one section: its options are flat flags (`--tp 2`) and, in YAML, either a mapping under the
section's name (`parallel: {tp: 2}`, as saved) or flat keys (`tp: 2`, as files written before the section existed).
`--help` and docs/cli.md list the options section by section.

jsonargparse was tried first: it would change every flag's syntax (`--overwrite true`, `--dataset+ a`), ignores help
kept in field metadata, and reports a bad value as a multi-line traceback; this module is the small part we need.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

from colossal_shear.core.errors import ConfigError
from colossal_shear.core.logger import get_logger

log = get_logger(__name__)

_NONE = ("none", "null", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    choices=None,
    default_factory=dataclasses.MISSING,
    negative: str | None = None,
    sep: str | None = None,
    aliases: tuple = (),
    metavar: str | None = None,
    default_text: str | None = None,
    const_flags: dict | None = None,
    cli: bool = True,
):
    """A config field. `negative`: the flag that sets a bool to False (default `--no_NAME`); `sep`: list items may
    also be given as one string joined by it; `aliases`: other flag spellings of the same option; `default_text`:
    how help and docs show a default computed on the machine (e.g. from its core count); `const_flags`: flags kept
    as aliases of one value (`{"--freeze_non_embeds_params": "align"}`), also accepted as YAML keys set to true;
    `cli=False`: set from code only (not a flag, not in YAML)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "negative": negative,
        "sep": sep,
        "aliases": tuple(aliases),
        "metavar": metavar,
        "default_text": default_text,
        "const_flags": dict(const_flags or {}),
        "cli": cli,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_section(cls, help: str = ""):
    """A nested section of options (e.g. the parallel layout), declared once as its own dataclass."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


# --- type conversion -------------------------------------------------------------------------------------------


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _type_name(inner[0]) if len(inner) == 1 else " | ".join(map(_type_name, inner))
    if origin is list:
        return f"list of {_type_name(args[0]) if args else 'str'}"
    if hint is Path:
        return "path"
    return getattr(hint, "__name__", str(hint))


def convert(value, hint, where: str, choices=None, sep: str | None = None):
    """`value` (from YAML, a flag or code) as the type `hint`; ConfigError naming `where` when it cannot be."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and str not in inner):
            return None
        return convert(value, inner[0], where, choices, sep)
    if origin is list:
        item = args[0] if args else str
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if sep:
            items = [
                part.strip()
                for v in items
                for part in (v.split(sep) if isinstance(v, str) else [v])
                if not isinstance(part, str) or part.strip()
            ]
        return [convert(v, item, where, choices) for v in items]
    result = _scalar(value, hint, where)
    if choices and result not in choices:
        raise ConfigError(f"{where}: {result!r} is not one of {', '.join(map(str, choices))}")
    return result


def _scalar(value, hint, where: str):
    bad = ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
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
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if hint is Path:
        if isinstance(value, (str, os.PathLike)) and str(value):
            return Path(os.path.expanduser(os.fspath(value)))
        raise bad
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) else str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise bad
    raise TypeError(f"{where}: unsupported config type {hint!r}")  # a bug in a config dataclass, not user input


# --- fields ----------------------------------------------------------------------------------------------------


class _Field(typing.NamedTuple):
    name: str
    hint: object
    field: dataclasses.Field
    section: str | None  # the nested section holding it, or None

    @property
    def meta(self):
        return self.field.metadata

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    def default(self):
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return None


def sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("section")}


def section_help(cls, name: str) -> str:
    return next(f.metadata.get("help") or "" for f in dataclasses.fields(cls) if f.name == name)


def flat_fields(cls) -> list[_Field]:
    """Every option of `cls`, nested sections' options included, each once (names are unique across sections)."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        if f.metadata.get("section"):
            sub = hints[f.name]
            sub_hints = typing.get_type_hints(sub)
            out += [_Field(g.name, sub_hints[g.name], g, f.name) for g in dataclasses.fields(sub) if g.init]
        else:
            out.append(_Field(f.name, hints[f.name], f, None))
    names = [f.name for f in out] + list(sections(cls))
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"{cls.__name__}: option or section names declared twice: {dup}"
    return out


# --- argparse --------------------------------------------------------------------------------------------------


def _default_text(f: _Field) -> str:
    if f.meta.get("default_text"):
        return f.meta["default_text"]
    d = f.default()
    if f.required:
        return "required"
    if isinstance(d, bool):
        return str(d).lower()
    if d is None:
        return "none"
    if isinstance(d, list):
        return ",".join(map(str, d)) or "none"
    return str(d)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's own error (unknown flag, missing value), its usage and one line, shown once per job."""
        log.error(f"{self.format_usage()}{self.prog}: error: {message}")
        self.exit(2)

    def print_help(self, file=None):
        """--help, shown once per job (a launch of N processes would print it N times)."""
        if file is not None:
            return super().print_help(file)
        log.info(self.format_help().rstrip("\n"))


def build_parser(cls, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """argparse from the dataclass; every flag defaults to 'not given' so YAML values are not overridden."""
    parser = _Parser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of any of these options (flags given on "
        "the command line override it); the file a run saves beside its outputs reproduces it",
    )
    groups = {name: parser.add_argument_group(f"{name} options", section_help(cls, name)) for name in sections(cls)}
    for f in flat_fields(cls):
        _add_option(groups.get(f.section, parser), f)
    return parser


def _add_option(parser, f: _Field) -> None:
    """The flag(s) of one option on `parser` (the parser or its section's argument group)."""
    help_ = (f.meta.get("help") or "").replace("%", "%%")
    choices = f.meta.get("choices")
    help_ += f" (default: {_default_text(f)})".replace("%", "%%")
    flags = [f"--{f.name}", *f.meta.get("aliases", ())]
    for flag, const in f.meta.get("const_flags", {}).items():
        parser.add_argument(flag, dest=f.name, action="store_const", const=const, help=f"alias of --{f.name} {const}")
    if f.hint is bool:
        parser.add_argument(*flags, dest=f.name, action="store_true", help=help_)
        negative = f.meta.get("negative") or f"--no_{f.name}"
        parser.add_argument(negative, dest=f.name, action="store_false", help=f"set --{f.name} off")
        return
    origin = typing.get_origin(f.hint)
    args = typing.get_args(f.hint)
    is_list = origin is list or any(typing.get_origin(a) is list for a in args)
    scalar = f.hint
    if origin in (typing.Union, types.UnionType):
        scalar = next(a for a in args if a is not type(None))
    item = typing.get_args(scalar)[0] if typing.get_origin(scalar) is list else scalar
    where = f"--{f.name}"

    def parse_one(text, item=item, where=where, choices=choices):
        try:
            return convert(text, typing.Optional[item], where, choices)  # noqa: UP045 (a runtime type)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    # items of a list that may be joined by `sep` are converted after splitting (in from_dict)
    parser.add_argument(
        *flags,
        dest=f.name,
        type=str if f.meta.get("sep") else parse_one,
        nargs="+" if is_list else None,
        metavar=f.meta.get("metavar")
        or ("{" + ",".join(map(str, choices)) + "}" if choices else _type_name(item).upper()),
        help=help_,
    )


def parse(cls, argv: typing.Sequence[str] | None = None, prog: str | None = None, description: str | None = None):
    """Defaults < YAML (--config) < flags; returns an instance of `cls`. Bad values raise ConfigError (one line);
    argparse's own errors (unknown flag, missing value) print the usage and one line, once per job, and exit 2."""
    parser = build_parser(cls, prog, description)
    given = vars(parser.parse_args(None if argv is None else [str(a) for a in argv]))
    values = load_yaml(given.pop("config"), cls) if given.get("config") else {}
    values.update(given)
    return from_dict(cls, values, "command line")


def from_dict(cls, values: dict, source: str):
    """An instance of `cls` from flat option values (converted and checked)."""
    fields = flat_fields(cls)
    missing = [f.name for f in fields if f.required and values.get(f.name) is None]
    if missing:
        raise ConfigError(
            f"{source}: missing required option{'s' if len(missing) > 1 else ''} "
            + ", ".join(f"--{m}" for m in missing)
        )
    top, nested = {}, {name: {} for name in sections(cls)}
    for f in fields:
        if f.name not in values:
            continue
        value = convert(values[f.name], f.hint, f"--{f.name}", f.meta.get("choices"), f.meta.get("sep"))
        (nested[f.section] if f.section else top)[f.name] = value
    for name, sub in sections(cls).items():
        top[name] = _construct(sub, nested[name], source)
    return _construct(cls, top, source)


def _construct(cls, kwargs: dict, source: str):
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own validation (__post_init__)
        raise ConfigError(f"{source}: {e}") from None


# --- YAML ------------------------------------------------------------------------------------------------------


def load_yaml(path, cls) -> dict:
    """Flat option values from a YAML mapping, converted to their types. A section's options may sit under its name
    (`optim: {lr: 1e-4}`, as saved) or at the top level (`lr: 1e-4`, as files written before the section existed);
    an option given both ways is an error."""
    fields = {f.name: f for f in flat_fields(cls)}
    flat, given = {}, set()
    for section, key, value in _entries(path, _read_mapping(path), sections(cls)):
        name, value = _option_of(path, fields, section, key, value)
        if name is None:  # a const flag set to false
            continue
        if name == key:
            if name in given:
                raise ConfigError(f"{path}: {name} is given twice (at the top level and under {fields[name].section})")
            given.add(name)
        flat[name] = value
    out = {}
    for key, value in flat.items():
        f = fields[key]
        out[key] = convert(value, f.hint, f"{path}: {key}", f.meta.get("choices"), f.meta.get("sep"))
    return out


def _read_mapping(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def _entries(path, data: dict, secs: dict):
    """(section or None, key, value) for every entry of the file, each section's mapping opened."""
    for key, value in data.items():
        if key not in secs:
            yield None, key, value
            continue
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping of option: value, got {type(value).__name__}")
        for sub_key, sub_value in (value or {}).items():
            yield key, sub_key, sub_value


def _option_of(path, fields: dict, section: str | None, key, value):
    """(option name, value) of one entry at the top level (`section` None) or inside a section: an option of that
    place, or a const flag's name set to true (`use_flash_attn: true`); (None, None) for one set to false."""
    here = [f for f in fields.values() if section is None or f.section == section]
    consts = {flag.lstrip("-"): (f.name, c) for f in here for flag, c in f.meta.get("const_flags", {}).items()}
    if key in consts:
        label = f"{section}.{key}" if section else key
        return consts[key] if convert(value, bool, f"{path}: {label}") else (None, None)
    f = fields.get(key)
    if f is not None and f in here:
        return key, value
    if f is not None:
        hint = f" ({key} belongs {f'under {f.section}' if f.section else 'at the top level'})"
    else:
        hint = _suggest(
            str(key), [g.name for g in here] + ([] if section else sorted({g.section for g in here} - {None}))
        )
    raise ConfigError(f"{path}: unknown option {f'{section}.{key}' if section else repr(key)}{hint}")


def _suggest(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_dict(cfg) -> dict:
    """Plain YAML-able values; sections as nested mappings."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init or f.metadata.get("cli") is False:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("section"):
            out[f.name] = to_dict(value)
        elif isinstance(value, os.PathLike):
            out[f.name] = os.fspath(value)
        elif isinstance(value, (list, tuple)):
            out[f.name] = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        else:
            out[f.name] = value
    return out


def to_yaml(cfg) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# --- docs ------------------------------------------------------------------------------------------------------


def flag_table(cls) -> str:
    """The markdown flag table(s) of a CLI (docs/cli.md is generated from these): the top-level options, then one
    table per section under its own heading."""
    fields = flat_fields(cls)
    top = [f for f in fields if f.section is None]
    parts = [_table(top)] if top else []
    for name in sections(cls):
        parts.append(f"### `{name}`: {section_help(cls, name)}\n\n" + _table([f for f in fields if f.section == name]))
    return "\n\n".join(parts)


def _table(fields: list[_Field]) -> str:
    rows = ["| flag | type | default | what it does |", "|---|---|---|---|"]
    for f in fields:
        flag = f"`--{f.name}`"
        others = [f"`{a}`" for a in f.meta.get("aliases", ())]
        others += [f"`{k}` = `--{f.name} {v}`" for k, v in f.meta.get("const_flags", {}).items()]
        if others:
            flag += " (" + ", ".join(others) + ")"
        if f.hint is bool:
            flag += f" / `{f.meta.get('negative') or '--no_' + f.name}`"
        kind = _type_name(f.hint)
        if f.meta.get("choices"):
            kind = " \\| ".join(map(str, f.meta["choices"]))
        help_ = (f.meta.get("help") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {flag} | {kind} | {_default_text(f).replace('|', '/')} | {help_} |")
    return "\n".join(rows)
