"""The C++ compiler that builds the sampling kernel, and the flags it takes.

torch's builder (``torch.utils.cpp_extension``) runs ``$CXX`` (else ``c++``) on Linux and
macOS and ``cl`` on Windows; charrnn only chooses what to pass it. The flags depend on
the compiler's family and the machine:

- GCC and clang: ``-O3 -ffast-math``, the machine's own instruction set
  (``-march=native``, and 512-bit vectors on x86 where the CPU has them;
  ``-mcpu=native`` on ARM), and OpenMP (``-fopenmp``) for the kernel's threads.
- Apple clang: the same, except that it has no OpenMP of its own: Homebrew's ``libomp``
  (``-Xpreprocessor -fopenmp -lomp``) is used where it is installed.
- MSVC: ``/O2 /fp:fast /openmp``, and AVX2 on x86.

OpenMP is tried on a small program before the kernel is built; without it the kernel is
built single-threaded (``-fopenmp-simd`` keeps its vector loops), which is slower only
for batches of streams.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Where Homebrew puts libomp (Apple silicon, then Intel Macs); $LIBOMP_PREFIX first.
LIBOMP_PREFIXES = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")
_OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
PROBE_TIMEOUT = 60.0  # seconds for one small compile, on a busy machine


@dataclass(frozen=True)
class Compiler:
    """A C++ compiler: the command torch's builder runs, its family and the first line of its version."""

    command: str
    family: str  # "gcc", "clang", "apple-clang" or "msvc"
    version: str = ""


@dataclass(frozen=True)
class KernelFlags:
    """What the kernel is compiled and linked with, and whether it has OpenMP threads."""

    cflags: list[str]
    ldflags: list[str]
    openmp: bool


def find_compiler() -> Compiler | None:
    """The compiler torch's builder would run here, or None where there is none on PATH."""
    if sys.platform == "win32":
        return Compiler("cl", "msvc") if shutil.which("cl") else None
    command = os.environ.get("CXX") or "c++"
    if shutil.which(command) is None:
        return None
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    version = (out.stdout or out.stderr).strip()
    return Compiler(command, compiler_family(version), version.splitlines()[0] if version else "")


def compiler_family(version: str) -> str:
    """The family a compiler's ``--version`` text names."""
    if "Apple clang" in version:
        return "apple-clang"
    if "clang" in version.lower():
        return "clang"
    if "Microsoft" in version:
        return "msvc"
    return "gcc"  # g++ says "g++ (Debian 14.2.0-19) 14.2.0"; an unknown one is asked GCC's flags


def base_flags(family: str, machine: str) -> list[str]:
    """Optimisation and instruction-set flags for ``family`` on a ``machine`` (``platform.machine()``)."""
    x86 = machine.lower() in ("x86_64", "amd64", "i686", "x86")
    if family == "msvc":
        return ["/O2", "/fp:fast"] + (["/arch:AVX2"] if x86 else [])
    flags = ["-O3", "-ffast-math"]
    if x86:
        flags += ["-march=native", "-mprefer-vector-width=512"]
    elif family != "apple-clang":  # Apple clang targets the machine's own chip already
        flags += ["-mcpu=native"]
    return flags


def openmp_candidates(family: str) -> list[tuple[list[str], list[str]]]:
    """The (compile, link) flags that may give ``family`` OpenMP, best first."""
    if family == "msvc":
        return [(["/openmp"], [])]
    if family == "apple-clang":
        prefixes = [os.environ["LIBOMP_PREFIX"]] if os.environ.get("LIBOMP_PREFIX") else []
        return [
            (["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"])
            for prefix in [*prefixes, *LIBOMP_PREFIXES]
            if Path(prefix, "include", "omp.h").exists()
        ]
    return [(["-fopenmp"], ["-fopenmp"])]


def compiles(compiler: Compiler, source: str, cflags: list[str], ldflags: list[str]) -> bool:
    """Whether ``compiler`` compiles and links ``source`` (a small C++ program) with these flags."""
    with tempfile.TemporaryDirectory(prefix="charrnn-probe-") as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(source)
        if compiler.family == "msvc":
            command = [compiler.command, "/nologo", *cflags, str(src), f"/Fe:{Path(tmp) / 'probe.exe'}", "/link", *ldflags]
        else:
            command = [compiler.command, *cflags, str(src), "-o", str(Path(tmp) / "probe"), *ldflags]
        try:
            return subprocess.run(command, capture_output=True, cwd=tmp, timeout=PROBE_TIMEOUT).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def kernel_flags(compiler: Compiler, machine: str | None = None) -> KernelFlags:
    """The kernel's flags for ``compiler`` here: OpenMP where a small program builds with it, else single-threaded."""
    flags = base_flags(compiler.family, machine or platform.machine())
    for cflags, ldflags in openmp_candidates(compiler.family):
        if compiles(compiler, _OPENMP_PROBE, cflags, ldflags):
            return KernelFlags(flags + cflags, ldflags, openmp=True)
    return KernelFlags(flags + ([] if compiler.family == "msvc" else ["-fopenmp-simd"]), [], openmp=False)


def no_openmp_hint(compiler: Compiler) -> str:
    """How to get the kernel's threads where the compiler has no OpenMP."""
    if compiler.family == "apple-clang":
        return "brew install libomp (or set LIBOMP_PREFIX), then delete the kernel's cache folder"
    return "install your compiler's OpenMP runtime (libgomp for GCC, libomp for clang), then delete the kernel's cache folder"
