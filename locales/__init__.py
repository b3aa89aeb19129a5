"""Built-in locales: where each gproc daemon sits in the tree (see :mod:`.base`)."""

from .base import (
    Host,
    Locale,
    LocaleError,
    LocaleOptions,
    Placement,
    find_locale,
    load_locale,
)

__all__ = [
    "Host",
    "Locale",
    "LocaleError",
    "LocaleOptions",
    "Placement",
    "find_locale",
    "load_locale",
]
