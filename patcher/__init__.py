"""patcher: compute, export and verify weight patches that erase knowledge from models.

The public API, imported on first use so that `import patcher` stays fast::

    spec = patcher.load_spec("lm/spec.toml")
    patch = patcher.erase(spec, "lm", method="alphaedit")
    patcher.apply("lm", patch, "lm-patched")
    report = patcher.verify("lm", "lm-patched", spec)

A model that ships its own code loads only inside ``with patcher.remote_code(True):``; hub ids
are fetched at another revision, cache or token inside ``with patcher.hub_access(HubAccess(...)):``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"

# A source checkout keeps kernels/ and formats/ beside patcher/, and the wheel installs them as
# patcher.kernels and patcher.formats (setup.py). `python -m patcher` run from the checkout's
# root imports this folder, not the installed package, so the checkout's root joins the places
# its subpackages are looked up in.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "setup.py").is_file() and not (Path(__path__[0]) / "formats").is_dir():
    __path__.append(str(_CHECKOUT))

# public name -> (module, attribute)
_PUBLIC = {
    "load_spec": ("patcher.spec", "load_spec"),
    "erase": ("patcher.erasure", "erase"),
    "Patch": ("patcher.formats.patch", "Patch"),
    "apply": ("patcher.api", "apply"),
    "export": ("patcher.exporting", "export_model"),
    "verify": ("patcher.verifying", "verify"),
    "release": ("patcher.api", "release"),
    "remote_code": ("patcher.models", "remote_code"),
    "hub_access": ("patcher.models", "hub_access"),
    "HubAccess": ("patcher.models", "HubAccess"),
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'patcher' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
