"""Config files in the published format, and what ``-d``, ``-b`` and ``-m`` name.

The published ``main.py`` merges ``configs/data/D.yaml``, ``configs/backbone/B.yaml`` and
``configs/method/M.yaml``, in that order, into its defaults (yacs), then the ``key value``
options. A file is a YAML mapping of option names to values; ``v:`` and ``l:`` hold the tuner
options as nested mappings; a string that is a Python literal is read as that value
(``mean: (0.5, 0.5, 0.5)`` is a tuple), as yacs decodes it::

    classifier: "CosineClassifier"
    v:
      adaptformer: True
      adaptformer_dim: 16
    num_epochs: 10

``-d``, ``-b`` and ``-m`` each take a known name or the path of such a file (``*.yaml`` /
``*.yml``); with ``--config-dir DIR`` a name is looked up as ``DIR/<kind>/NAME.yaml`` first, so a
copy of the published ``configs/`` folder, edited, is used as it is. Files are read with PyYAML's
safe loader: no file can make the package run code. An unknown key, a duplicated key or a value
that fails its option's check is an error naming the file, the key and its line.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import yaml

from .config import ConfigSource, is_option, preset_source
from .errors import MissingInputError, UserInputError

__all__ = ["KINDS", "config_source", "read_config_file"]

KINDS = ("data", "backbone", "method")
_SUFFIXES = (".yaml", ".yml")
_NESTED = ("v", "l")  # the tuner option groups a file writes as nested mappings


def _mapping_items(loader: yaml.SafeLoader, node: yaml.Node, path: str, what: str) -> List[Tuple[str, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise UserInputError(
            f"{path}, line {node.start_mark.line + 1}: {what} must be a mapping of option names to values"
        )
    items, seen = [], {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise UserInputError(f"{path}, line {line}: option names are strings; got {key!r}")
        if key in seen:
            raise UserInputError(f"{path}, line {line}: option {key!r} is set twice (first on line {seen[key]})")
        seen[key] = line
        items.append((key, value_node))
    return items


def read_config_file(path: str) -> Tuple[Tuple[str, object, int], ...]:
    """The ``(key, value, line)`` settings of a published-format config file, in file order.

    Nested ``v:`` / ``l:`` mappings become ``v.<name>`` / ``l.<name>`` keys. Raises
    :class:`~liftplus_fast.errors.MissingInputError` when the file is missing and
    :class:`~liftplus_fast.errors.UserInputError` naming the file (and line) when it is not
    YAML, not a mapping, or holds a key that is no option.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"config file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:  # an empty file sets nothing, as yacs reads it
            return ()
        settings = []
        for key, node in _mapping_items(loader, root, path, "a config file"):
            if key in _NESTED:
                for sub, sub_node in _mapping_items(loader, node, path, f"{key!r}"):
                    settings.append((f"{key}.{sub}", sub_node))
            else:
                settings.append((key, node))
        out = []
        for key, node in settings:
            line = node.start_mark.line + 1
            if key == "method":  # what -m names; a method file's own name names it
                raise UserInputError(f"{path}, line {line}: 'method' is not set in a config file (-m names the method)")
            if not is_option(key):
                raise UserInputError(
                    f"{path}, line {line}: unknown option {key!r} (liftplus-fast options lists every option)"
                )
            if isinstance(node, yaml.MappingNode):
                raise UserInputError(f"{path}, line {line}: option {key!r} takes a value, not a mapping")
            out.append((key, loader.construct_object(node, deep=True), line))
        return tuple(out)
    except yaml.YAMLError as exc:
        # PyYAML's message carries the line and column of the problem.
        raise UserInputError(f"{path}: not a valid YAML config file: {exc}") from None
    finally:
        loader.dispose()


def _config_path(kind: str, name: str, config_dir: Optional[str]) -> Optional[str]:
    if name.lower().endswith(_SUFFIXES):
        if not os.path.isfile(name):
            raise MissingInputError(f"{kind} config file not found: {name!r}")
        return name
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise MissingInputError(f"--config-dir {config_dir!r} is not a folder")
        for suffix in _SUFFIXES:
            candidate = os.path.join(config_dir, kind, name + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def config_source(kind: str, name: str, config_dir: Optional[str] = None) -> ConfigSource:
    """What ``-d`` / ``-b`` / ``-m`` (``kind`` data, backbone or method) ``name`` sets.

    A config file (``name`` ending in ``.yaml`` / ``.yml``, or ``config_dir/<kind>/<name>.yaml``)
    sets what it holds; a method file also names the method (its stem). Otherwise ``name`` is a
    known data set, backbone or method (:func:`liftplus_fast.config.preset_source`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    path = _config_path(kind, name, config_dir)
    if path is None:
        try:
            return preset_source(kind, name)
        except UserInputError as exc:
            if config_dir is None:
                raise
            raise UserInputError(f"{exc} (and no {os.path.join(config_dir, kind, name)}.yaml)") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    settings = read_config_file(path)
    if kind == "method":
        settings = (("method", stem, None),) + settings
    return ConfigSource(stem, settings, path)
