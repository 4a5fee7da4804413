"""JSON round-tripping for frozen dataclasses: `to_dict`/`from_dict` with a `version` field.

Loading rejects unknown keys with an error naming the key, so a typo in a recipe file is caught.
"""

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

from memwise.core.errors import BadInputError

SCHEMA_VERSION = 1
T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """Converts a dataclass (recursively) into JSON-ready dicts, lists and scalars.

    The outermost object carries the schema `version`; nested objects do not repeat it.
    """
    out = _plain(obj)
    if isinstance(out, dict) and dataclasses.is_dataclass(obj):
        out = {"version": SCHEMA_VERSION, **out}
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {field.name: _plain(getattr(obj, field.name)) for field in dataclasses.fields(obj)}
        # `json_derived`: read-only properties a reader of the JSON needs (Recipe.grad_accumulation_steps)
        return {**fields, **{name: _plain(getattr(obj, name)) for name in getattr(obj, "json_derived", ())}}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    return obj


def from_dict(cls: type[T], data: Any, *, where: str | None = None) -> T:
    """Builds `cls` from `data` made by `to_dict`; unknown keys raise BadInputError naming them."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {field.name: field for field in dataclasses.fields(cls)}
    derived = set(getattr(cls, "json_derived", ()))
    unknown = sorted(set(data) - set(known) - {"version"} - derived)
    if unknown:
        raise BadInputError(
            f"{where}: unknown key {unknown[0]!r}; valid keys are {', '.join(sorted(known))}"
        )
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise BadInputError(f"{where}: unsupported version {version!r}; this memwise reads version {SCHEMA_VERSION}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items() if name in known
    }
    built = cls(**kwargs)
    for name in sorted(derived & set(data)):
        if data[name] != getattr(built, name):
            raise BadInputError(f"{where}: {name} is {data[name]!r} but the other fields give {getattr(built, name)!r}")
    return built


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [arg for arg in args if arg is not type(None)]
        return _convert(non_none[0], value, where) if len(non_none) == 1 else value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            valid = ", ".join(member.value for member in hint)
            raise BadInputError(f"{where}: invalid value {value!r}; valid values are {valid}") from None
    if origin is tuple:
        item = args[0] if args else Any
        return tuple(_convert(item, element, where) for element in value)
    if origin is dict:
        value_type = args[1] if len(args) == 2 else Any
        return {key: _convert(value_type, element, where) for key, element in value.items()}
    return value
