"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and misses code-generation errors:
types the compiler rejects, layouts ptxas cannot place, constexpr branches it never took. This
builds the real GPU binary in a fresh interpreter-free process wherever Triton's NVIDIA backend
and ptxas are installed (the CPU CI machine has them).
"""
import json
import os
import subprocess
import sys

import pytest

COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget

module_name, builds = json.loads(sys.argv[1])
module = importlib.import_module(module_name)
for kernel, types, constexprs in builds:
    fn = getattr(module, kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, types["*pointer" if name.endswith("_ptr") else "*scalar"])
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print("compiled", len(builds))
"""


def assert_compiles_for_hopper(module: str, builds: list) -> None:
    """Compile each (kernel name, types, constexprs) of `module` for sm_90.

    types maps argument names to Triton types ("*bf16", "i32", "fp32", ...); "*pointer" and
    "*scalar" give the type of the pointer (…_ptr) and scalar arguments not named there.
    """
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE, json.dumps([module, builds])], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and f"compiled {len(builds)}" in result.stdout, result.stderr[-3000:]
