"""gproc: run a program across a cluster through a tree of daemons.

In a source checkout the sub-packages ``gproc.locales`` and ``gproc.deploy`` live in the
top-level folders ``locales/`` and ``deploy/`` (pyproject maps them on install). When this
package is imported straight from a checkout (``python -m gproc`` in the repository), the
checkout's root joins the package path so those two resolve there too.
"""

import os as _os

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "locales", "kane.py")) and _os.path.isfile(
    _os.path.join(_checkout, "pyproject.toml")
):
    __path__.append(_checkout)  # noqa: F821 - __path__ is set for packages

__version__ = "0.1.0"
