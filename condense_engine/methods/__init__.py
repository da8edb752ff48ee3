"""Condensation methods; each registers itself under its name for `distill(method=...)`."""
from condense_engine.methods import dc  # noqa: F401  (registers "dc", "dsa")
from condense_engine.methods import dd  # noqa: F401  (registers "dd")
from condense_engine.methods import idc  # noqa: F401  (registers "idc")
from condense_engine.methods import dm  # noqa: F401  (registers "dm")
from condense_engine.methods import dq  # noqa: F401  (registers "dq")
from condense_engine.methods import mtt  # noqa: F401  (registers "mtt", "tesla", "datm")
from condense_engine.methods.base import Method, get_method, method_names, register

__all__ = ["Method", "get_method", "method_names", "register"]
