"""Drop-in ops: each checks its inputs, then runs the best backend (triton | native | torch).

See SPEC §1: every op takes `backend=`; `set_backend()` or CONDENSE_BACKEND force one.
"""
from condense_engine.ops._backend import set_backend
from condense_engine.ops.gather import gather_normalize

__all__ = ["set_backend", "gather_normalize"]
