"""Build condense_engine._C from csrc/ and map kernels/ to condense_engine.kernels.

The CPU part of the extension always builds. The CUDA part (csrc/ops/cuda) builds when torch
has CUDA and a toolkit is found, or when FORCE_CUDA=1 insists on it. Set CONDENSE_NO_EXT=1 to
skip the extension entirely (the package then falls back to the torch reference ops).
"""
import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _nvidia_wheel_include_dirs():
    """Header folders of the NVIDIA wheels a CUDA torch from PyPI depends on (cuBLAS, cuSPARSE, ...).

    torch's CUDA headers include cusparse.h and cublas_v2.h; a toolkit that holds only the
    compiler and runtime (as on the lent GPU machines) lacks them, but the wheels beside torch
    have them. They are searched after every other folder, so a full toolkit still wins.
    """
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def _toolkit_root_behind_nvcc():
    """The CUDA toolkit folder of the `nvcc` on PATH, or None when there is no nvcc or it cannot tell.

    torch takes the toolkit to be two levels above `nvcc`; a wrapper script such as
    /usr/local/bin/nvcc (exec'ing the real one) makes that /usr/local, and the build then finds
    the NVIDIA wheels' cuda_runtime headers without the toolkit's crt/ headers and fails. nvcc's
    dry run names the folder it really lives in.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guessed = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guessed, "include", "cuda_runtime.h")):
        return guessed
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in dry_run.splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def _extensions():
    if os.environ.get("CONDENSE_NO_EXT") == "1":
        return [], {}
    import torch

    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    wants_cuda = torch.version.cuda is not None or force_cuda
    if wants_cuda and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        toolkit = _toolkit_root_behind_nvcc()
        if toolkit is not None:  # read by torch.utils.cpp_extension at import
            os.environ["CUDA_HOME"] = toolkit
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = _sources("csrc/*.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) or force_cuda
    extra = {"cxx": ["-O3", "-fopenmp"]}  # the C++ standard is the one torch's BuildExtension sets
    if with_cuda:
        sources += _sources("csrc/ops/cuda/*.cu") + _sources("csrc/ops/cuda/*_bind.cpp")
        extra["cxx"] += ["-idirafter" + d for d in _nvidia_wheel_include_dirs()]
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "condense_engine._C", sources, extra_compile_args=extra,
            define_macros=[("WITH_CUDA", None)], extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("condense_engine._C", sources, extra_compile_args=extra,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _replacing(BuildExtension).with_options(use_ninja=True)}


def _replacing(build_ext):
    """`build_ext` that replaces an installed library with a new file instead of rewriting it in
    place (as `pip install -e .` does otherwise): a process that has the old one loaded, such as
    a long run going while someone rebuilds, keeps running the code it started with."""
    class ReplacingBuildExtension(build_ext):
        def copy_file(self, infile, outfile, *args, **kwargs):
            if outfile.endswith((".so", ".pyd")) and os.path.isfile(outfile):
                os.unlink(outfile)  # the loaded library's inode lives on until its users exit
            return super().copy_file(infile, outfile, *args, **kwargs)
    return ReplacingBuildExtension


ext_modules, cmdclass = _extensions()
packages = find_packages(include=["condense_engine", "condense_engine.*"]) + ["condense_engine.kernels"]

setup(
    packages=packages,
    package_dir={"condense_engine.kernels": "kernels"},
    package_data={"condense_engine.datasets": ["embedded/*.npz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
