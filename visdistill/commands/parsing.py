"""The one parser style of every ``visdistill`` subcommand: jsonargparse, as LightningCLI.

Options are typed from the signature of the library function a command calls (its docstring
gives the help), every command takes ``--config FILE`` (YAML of the same options) and
``--print_config``. Two things are added to jsonargparse's own parsing:

- ``--config`` files are read first by :class:`ConfigFile`, so a missing file, malformed
  YAML or a key given twice is one line naming the file and line (PyYAML and jsonargparse
  silently keep the last of two equal keys: a pasted ``lr`` line would override the first).
- :func:`accept_legacy_spelling`: the spellings of the former argparse front ends still
  work (``--batch-size`` for ``--batch_size``, a bare ``--overwrite`` for
  ``--overwrite true``, ``--no-progress`` for ``--progress false``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..errors import ConfigError

_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a mapping holding the same key twice."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base": keys given next to it override the base's
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key!r} (first at line {first[key]})",
                            key_node.start_mark,
                        )
                except TypeError:  # an unhashable key: the base class reports it
                    break
                first[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def check_config_file(value: str) -> None:
    """Read the ``--config`` file ``value`` (a path, or an inline YAML string, which is left
    to jsonargparse): a missing or malformed file, or a key given twice in one mapping, is a
    :class:`~visdistill.errors.ConfigError` naming the file and line."""
    import yaml

    if not isinstance(value, str) or value.lstrip().startswith(("{", "[")) or "\n" in value:
        return  # an inline YAML string, parsed by jsonargparse
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"config file not found: {value} (resolved: {path.resolve()})")
    try:
        yaml.load(path.read_text(), Loader=_unique_key_loader())  # noqa: S506 (SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{value}:{where}: invalid YAML: {problem}") from None


class ConfigFile(ActionConfigFile):
    """jsonargparse's ``--config``, checking the file with :func:`check_config_file` first
    (jsonargparse would report a bad file as ``<unicode string>`` after its usage text)."""

    def __call__(self, parser, cfg, values, option_string=None):
        check_config_file(values)
        super().__call__(parser, cfg, values, option_string)


def new_parser(prog: str, description: str) -> ArgumentParser:
    """An empty command parser with ``-c/--config`` and ``--print_config``."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "-c", "--config", action=ConfigFile, help="a YAML file of this command's options"
    )
    return parser


def add_function(
    parser: ArgumentParser,
    function: Callable[..., Any],
    skip: set[str] | None = None,
    positional: tuple[str, ...] = (),
) -> list[str]:
    """Add ``function``'s parameters as options (types, defaults and help from its signature
    and docstring); the parameters named in ``positional`` become positional arguments, in
    that order. New keyword parameters of ``function`` appear as options by themselves."""
    skip = set(skip or ())
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):  # an annotation only importable under TYPE_CHECKING
        hints = {}
    for name in positional:
        annotation = hints.get(name, str)
        parser.add_argument(name, type=annotation, help=_param_help(function, name))
    added = parser.add_function_arguments(
        function, nested_key=None, as_group=False, skip=skip | set(positional)
    )
    return [*positional, *added]


def _param_help(function: Callable[..., Any], name: str) -> str | None:
    """The docstring's description of parameter ``name`` (Google style), if any."""
    try:
        from docstring_parser import parse
    except ImportError:  # jsonargparse's docstring support is optional
        return None
    for param in parse(function.__doc__ or "").params:
        if param.arg_name == name:
            return param.description
    return None


def _parsers(parser: ArgumentParser) -> Iterator[ArgumentParser]:
    """``parser`` and its subcommand parsers, recursively."""
    yield parser
    sub = getattr(parser, "_subcommands_action", None)
    for child in sub._name_parser_map.values() if sub is not None else ():
        yield from _parsers(child)


def _is_bool_option(action) -> bool:
    hint = getattr(action, "_typehint", None)
    return hint is bool or (
        typing.get_origin(hint) in (typing.Union, types.UnionType)
        and set(typing.get_args(hint)) == {bool, type(None)}
    )


def accept_legacy_spelling(parser: ArgumentParser, args: list[str]) -> list[str]:
    """``args`` with the former argparse spellings rewritten to ``parser``'s options:
    ``--top-k 5`` -> ``--top_k 5``, a bare boolean ``--overwrite`` -> ``--overwrite=true``,
    ``--no-progress`` -> ``--progress=false``. Anything ``parser`` knows is left alone."""
    options = {o: a for p in _parsers(parser) for a in p._actions for o in a.option_strings}
    out: list[str] = []
    for i, token in enumerate(args):
        if token == "--":
            return out + args[i:]
        if not token.startswith("--"):
            out.append(token)
            continue
        name, eq, value = token.partition("=")
        if name not in options:
            underscored = "--" + name[2:].replace("-", "_")
            if underscored in options:
                name = underscored
            elif underscored.startswith("--no_") and not eq:
                positive = "--" + underscored[5:]
                if positive in options and _is_bool_option(options[positive]):
                    name, eq, value = positive, "=", "false"
        action = options.get(name)
        if action is not None and not eq and _is_bool_option(action):
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.lower() not in _BOOL_WORDS:
                eq, value = "=", "true"  # a bare flag, as argparse's store_true
        out.append(name + eq + value)
    return out


def parse(parser: ArgumentParser, args: list[str]) -> Namespace:
    """Parse ``args`` (legacy spellings accepted); ``--help``/``--print_config`` exit 0."""
    return parser.parse_args(accept_legacy_spelling(parser, args))
