"""The C++ CPU kernels (``csrc/``): compiled on first use with the system's C++ compiler and
``ninja``, once per machine and kind of CPU, into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``); later processes load them in well under a second. Where a
kernel cannot be built the caller gets None (with the reason printed) and uses its torch path."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
BUILD_WAIT_S = 600  # how long a process waits for another one's build before giving up


def build(name: str, source: Path, what: str, fallback: str):
    """Load (building if needed) the extension ``name`` from ``source``; None where that fails.
    ``what`` names it in messages, ``fallback`` says what is used instead."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, in a venv that is not activated
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    name = extension_name(name)
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):  # (x86 options; elsewhere the compiler's defaults)
        flags += ["-march=native", "-mprefer-vector-width=512"]
    t0 = time.perf_counter()
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, False))
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"ssm-gym: building the {what} (once per machine, about half a minute) ...", file=sys.stderr)
        with build_lock(build_dir):
            module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=flags,
                                        extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 (no compiler, a failed build, a wait that ran out: the torch path works)
        print(f"ssm-gym: could not build the {what} ({type(e).__name__}: {str(e)[:300]}); {fallback}",
              file=sys.stderr)
        return None
    if time.perf_counter() - t0 > 5:
        print(f"ssm-gym: {what} ready after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return module


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Serialise builds across processes with an OS lock, which dies with its process. torch's own
    lock is a plain file: a build killed half-way leaves it behind and every later process would
    wait on it forever. Holding this lock, any such file is stale, so it is removed."""
    try:
        import fcntl
    except ImportError:  # (not POSIX: torch's lock alone)
        yield
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.ssm_gym_lock", "w") as f:
        deadline = time.monotonic() + BUILD_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building the kernel in {build_dir} for "
                                       f"{BUILD_WAIT_S} s") from None
                time.sleep(0.5)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def extension_name(name: str) -> str:
    """The name a kernel is built and cached under: one build per kind of CPU and headers."""
    return f"{name}_{cpu_tag()}_{headers_tag()}"


def headers_tag() -> str:
    """A short hash of the shared headers (``csrc/*.h``): torch rebuilds an extension when its
    source file changes but does not look at the headers it includes, so a header's edit makes a
    new name (and so a new build)."""
    digest = hashlib.sha1()
    for h in sorted(CSRC.glob("*.h")):
        digest.update(h.read_bytes())
    return digest.hexdigest()[:8]


def cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: the kernels are built with -march=native,
    so a cache shared between machines (a network home directory) keeps one build per kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:8]


class Kernel:
    """One kernel, built or loaded on first use (thread-safe); ``get()`` is None where it cannot
    be built, or where the environment variable ``switch`` is "0". ``enabled`` (a plain attribute,
    which torch.compile guards on) is what ``switched(False)`` turns off for a block: callers
    check it where they choose between the kernel and torch's path."""

    def __init__(self, name: str, source: str, what: str, fallback: str, switch: str):
        import threading

        self.name, self.source, self.what, self.fallback, self.switch = name, CSRC / source, what, fallback, switch
        self.module = None  # the loaded extension; False once building failed or it is switched off
        self.enabled = True
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def switched(self, enabled: bool):
        """Within the block, the kernel where it applies (``True``) or torch's path everywhere
        (``False``): for comparisons and benchmarks. A backward runs on whatever its forward took."""
        before = self.enabled
        self.enabled = before and enabled
        try:
            yield
        finally:
            self.enabled = before

    def get(self):
        with self._lock:  # (threads asking during the build wait for it, not for None)
            if self.module is None:
                self.module = False
                if os.environ.get(self.switch, "1") != "0":
                    self.module = build(self.name, self.source, self.what, self.fallback) or False
        return self.module or None
