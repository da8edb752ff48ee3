"""Drop-in ops: each checks its inputs, then runs the best backend (triton | native | torch).

See SPEC §1: every op takes `backend=`; `set_backend()` or CONDENSE_BACKEND force one.
"""
from condense_engine.ops._backend import set_backend
from condense_engine.ops.dsa import DSAParams, default_strategy, dsa
from condense_engine.ops.embed import embed_epilogue
from condense_engine.ops.gather import gather_normalize
from condense_engine.ops.mmd import mmd
from condense_engine.ops.moments import moments
from condense_engine.ops.match_dist import match_dist
from condense_engine.ops.trajectory import RowShare, trajectory_match, unroll

__all__ = ["set_backend", "gather_normalize", "dsa", "DSAParams", "default_strategy", "mmd", "moments",
           "trajectory_match", "unroll", "RowShare", "embed_epilogue", "match_dist"]
