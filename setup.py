"""Builds fastunet._C: the C++ CPU twin always, and the CUDA kernels when nvcc is found.

Environment:
    FASTUNET_CUDA        unset: CUDA when nvcc is found; 0: no CUDA; 1: a missing nvcc is an error
    FASTUNET_CUDA_ARCHS  SASS targets, e.g. "75;80;86;89;90" (the default); PTX for the newest
    CUDA_HOME, CUDA_PATH the CUDA toolkit (else the one of the nvcc on PATH)
    MAX_JOBS             parallel compile jobs (default: all cores)

No torch at build time: the module binds raw pointers, so it needs only pybind11, and one build
serves every torch version. The CUDA runtime is linked statically.
"""

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEFAULT_ARCHS = "75;80;86;89;90"
CPP_SOURCES = ["csrc/module.cpp", "csrc/max_pool2d_cpu.cpp"]
CUDA_SOURCES = ["csrc/max_pool2d_cuda.cu"]
HEADERS = ["csrc/max_pool2d.h", "csrc/max_pool2d_launch.h"]


def jobs() -> int:
    return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)


def cuda_wanted() -> bool | None:
    """FASTUNET_CUDA: None (unset: if found), False (0) or True (1: required)."""
    value = os.environ.get("FASTUNET_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"FASTUNET_CUDA={value!r}: use 0 (no CUDA) or 1 (CUDA required)")
    return None if value == "" else value == "1"


def find_cuda() -> tuple[str, str] | str:
    """(nvcc, directory of libcudart_static.a) from CUDA_HOME, CUDA_PATH or the nvcc on PATH;
    else why CUDA cannot be built."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        where, homes = f"CUDA_HOME or CUDA_PATH is {home}", [home]
    else:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return "nvcc was not found at build time (CUDA_HOME, CUDA_PATH, PATH)"
        # nvcc on PATH may be a symlink or a wrapper script, so /usr/local/cuda is tried too.
        where = f"nvcc on PATH is {nvcc}"
        homes = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in homes:
        nvcc = os.path.join(home, "bin", "nvcc")
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            runtime = os.path.join(home, lib)
            if os.path.isfile(nvcc) and os.path.isfile(os.path.join(runtime, "libcudart_static.a")):
                return nvcc, runtime
    return f"{where}, but no CUDA toolkit with bin/nvcc and libcudart_static.a is there"


def cuda_archs() -> list[int]:
    """FASTUNET_CUDA_ARCHS as numbers: "75;8.0, sm_86" -> [75, 80, 86]."""
    archs = set()
    for word in re.findall(r"[^;,\s]+", os.environ.get("FASTUNET_CUDA_ARCHS") or DEFAULT_ARCHS):
        number = word.removeprefix("sm_").replace(".", "")
        if not number.isdigit():
            raise SystemExit(f"FASTUNET_CUDA_ARCHS: {word!r} is not an arch like 86, 8.6 or sm_86")
        archs.add(int(number))
    if not archs:
        raise SystemExit("FASTUNET_CUDA_ARCHS names no arch")
    return sorted(archs)


def nvcc_version(nvcc: str) -> str:
    """The V number of `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release \S+, V(\S+)", output).group(1)


def c_string(text: str) -> str:
    return json.dumps(text)  # a valid C string literal for ASCII text


class BuildExt(build_ext):
    """Compiles the .cu sources with nvcc (when CUDA is built), then the C++ sources in
    parallel, and links them all into one module."""

    def finalize_options(self):
        super().finalize_options()
        # The module depends on FASTUNET_* and the toolkit, which the up-to-date check of a
        # left-over build/ does not see: always build.
        self.force = True

    def build_extension(self, ext):
        import pybind11  # a build requirement; imported here so that metadata needs no compiler

        ext.include_dirs.append(pybind11.get_include())
        wanted = cuda_wanted()
        cuda = find_cuda() if wanted is not False else "FASTUNET_CUDA=0 at build time"
        if isinstance(cuda, str) and wanted:
            raise SystemExit(f"FASTUNET_CUDA=1, but {cuda}")
        if isinstance(cuda, str):
            print(f"fastunet._C: building the CPU twin only: {cuda}")
            ext.define_macros += self.build_info_macros(False, [], "", cuda)
        else:
            nvcc, cuda_lib = cuda
            archs = cuda_archs()
            reported = [f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"]
            print(f"fastunet._C: building CUDA for {' '.join(reported)} with {nvcc}")
            ext.extra_objects += self.compile_cuda(nvcc, archs)
            ext.define_macros += self.build_info_macros(True, reported, nvcc_version(nvcc), "")
            ext.library_dirs.append(cuda_lib)
            ext.libraries += ["cudart_static", "dl", "pthread", "rt"]
        self.compiler.compile = parallel(self.compiler.compile)
        super().build_extension(ext)

    @staticmethod
    def build_info_macros(cuda: bool, archs: list[str], nvcc: str, reason: str) -> list:
        return [
            ("FASTUNET_WITH_CUDA", str(int(cuda))),
            ("FASTUNET_CUDA_ARCHS", c_string(" ".join(archs))),
            ("FASTUNET_NVCC_VERSION", c_string(nvcc)),
            ("FASTUNET_NO_CUDA_REASON", c_string(reason)),
        ]

    def compile_cuda(self, nvcc: str, archs: list[int]) -> list[str]:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        objects = []
        for source in CUDA_SOURCES:
            obj = os.path.join(self.build_temp, source.replace(".cu", ".o"))
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            command = [
                nvcc, "-c", source, "-o", obj, "-std=c++17", "-O3", "-lineinfo",
                "-Xcompiler=-fPIC,-fvisibility=hidden", f"--threads={jobs()}", *gencode,
            ]  # fmt: skip
            print(" ".join(command))
            subprocess.run(command, check=True)
            objects.append(obj)
        return objects


def parallel(compile_sources):
    """CCompiler.compile, one source per job."""

    def compile_in_parallel(sources, *args, **kwargs):
        with ThreadPoolExecutor(jobs()) as pool:
            results = pool.map(lambda source: compile_sources([source], *args, **kwargs), sources)
            return [obj for objects in results for obj in objects]

    return compile_in_parallel


setup(
    ext_modules=[
        Extension(
            "fastunet._C",
            sources=CPP_SOURCES,
            depends=HEADERS + CUDA_SOURCES,  # so that the sdist carries them
            include_dirs=["csrc"],
            # -g0: Python's flags add -g, which would triple the module's size.
            extra_compile_args=["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-pthread"],
            # The static CUDA runtime's symbols stay unexported: no clash with torch's runtime.
            extra_link_args=["-Wl,--exclude-libs,ALL", "-pthread"],
            language="c++",
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
