"""Typed values of the configuration dataclasses, checked by pydantic, refusals naming their key.

Every section of the job's configuration (``colm_server.config``), ``SelectorConfig`` and
``ShardConfig`` check their fields' types here, so YAML, ``--set`` and direct construction refuse
a value alike: strictly (``'16'`` is no int, ``1`` no bool, ``1.5`` no int; an int is a float),
floats finite, a list taken for a tuple and back, the message naming ``key`` or the entry at fault.
"""

from __future__ import annotations

import operator
import reprlib
import types
import typing
from collections.abc import Mapping
from functools import cache, reduce
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, FiniteFloat, TypeAdapter, ValidationError


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_REPR = reprlib.Repr()  # bounded: a YAML alias bomb must not be spelled out in an error message
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 6


def show(value: Any) -> str:
    """``value`` as a refusal quotes it: bounded in depth and length."""
    text = _REPR.repr(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _arms(hint: Any) -> tuple[Any, ...]:
    """The types a union allows, or ``(hint,)``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def _pydantic_type(hint: Any) -> Any:
    """``hint`` as pydantic checks it here: floats finite; a list or a tuple taken for either."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if len(_arms(hint)) > 1:
        return reduce(operator.or_, map(_pydantic_type, args))
    if origin is dict:
        return dict[args[0], _pydantic_type(args[1])]
    if origin in (list, tuple):  # YAML has one kind of sequence; the field's kind is kept
        kind = list[_pydantic_type(args[0])] if origin is list else tuple[_pydantic_type(args[0]), ...]
        return Annotated[kind, BeforeValidator(lambda v: origin(v) if isinstance(v, (list, tuple)) else v)]
    return FiniteFloat if hint is float else hint


@cache
def _adapter(hint: Any) -> TypeAdapter:
    # strict: YAML has typed every value already, so '16' is no int, 1 no bool and 1.5 no int
    return TypeAdapter(_pydantic_type(hint), config=ConfigDict(strict=True))


def typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` validated (and converted: int to float, list to tuple) as ``hint`` by pydantic.

    A refusal names ``key``, or the entry at fault inside a mapping or list; a value of a union
    names the union, unless it is a mapping where a mapping may be: what is wrong inside says more.
    """
    maps = [a for a in _arms(hint) if typing.get_origin(a) is dict]
    if maps and isinstance(value, Mapping):
        hint = maps[0]
    try:
        return _adapter(hint).validate_python(value)
    except ValidationError as e:
        first = min(e.errors(), key=lambda err: "[key]" not in err["loc"])  # keys first, as YAML reads
    if len(_arms(hint)) > 1:
        raise ValueError(f"{key}: expected {_type_name(hint)}, got {show(value)}") from None
    loc, got = first["loc"], show(first["input"])
    if "[key]" in loc:
        raise ValueError(f"{_place(key, hint, loc[:-2])[0]}: keys must be text, got {got} "
                         "(in YAML, quote keys such as no, on, 1 or null)") from None
    key, hint = _place(key, hint, loc)
    number = isinstance(first["input"], int) and not isinstance(first["input"], bool)
    if first["type"] == "finite_number" or hint is float and number:
        raise ValueError(f"{key}: must be a finite number, got {got}") from None  # nan, inf, 10**400
    raise ValueError(f"{key}: expected {_type_name(hint)}, got {got}") from None


def _place(key: str, hint: Any, loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """The key (``a.b``, ``a[0]``) and the type at ``loc``, a pydantic error's path into ``hint``."""
    for part in loc:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        key, hint = (f"{key}.{part}", args[1]) if origin is dict else (f"{key}[{part}]", args[0])
    return key, hint


def check_types(obj: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Validate (and convert) every field of the dataclass ``obj`` but ``skip``, keys ``prefix + name``."""
    for name, hint in hints(type(obj)).items():
        if name not in skip:
            setattr(obj, name, typed(f"{prefix}{name}", getattr(obj, name), hint))
