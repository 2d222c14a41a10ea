"""Importing a config's ``plugins:`` modules, which register a user's objectives, formats and towers as they load
(`mmkd.plugins`). Below config.py, so that every way of building a RunConfig imports them first."""

from __future__ import annotations

import importlib
import re

from mmkd.errors import ConfigError

MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_plugins(names: list[str], key: str = "plugins") -> None:
    """Import a config's plugin modules (they register objectives, formats, towers as they load). Module names
    only: a file path is refused, because a config that names a file would run code from wherever it points."""
    for i, name in enumerate(names):
        where = f"{key}[{i}]"
        if not isinstance(name, str) or not MODULE_NAME.match(name) or name.endswith(".py"):  # a.py: a file
            raise ConfigError(f"{where}: {name!r} is not a module name; a plugin is an importable module "
                              "(my_pkg.losses), never a file path: put its folder on PYTHONPATH or pip-install it")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise ConfigError(f"{where}: importing {name!r} failed: {e}") from None
            raise ConfigError(f"{where}: no module named {name!r}; put the folder holding it on PYTHONPATH "
                              "(e.g. PYTHONPATH=examples) or pip-install its package") from None
        except Exception as e:  # the plugin's own code failed: its message, in one line naming the key
            raise ConfigError(f"{where}: importing {name!r} failed: {type(e).__name__}: {e}") from None
