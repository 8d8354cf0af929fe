"""Per-layer choice between a fastunet op and PyTorch's own path, by measurement, cached on disk.

A drop-in must never make a layer slower. For each (device name, op, pass, dtype, shapes,
layouts), the first call on a GPU times the fastunet op and PyTorch's own path (cuDNN conv +
bias + ReLU, aten's interpolate + cat, aten's max-pool) on the call's own inputs, forward alone
or forward + backward as the call needs, the way inductor's max-autotune weighs aten against its
Triton templates. The faster runs from then on. Measured choices are saved as JSON lines in
`cache_dir()` (FASTUNET_CACHE_DIR), stamped with the versions and kernel sources that made them,
so a new process neither re-measures nor changes its bit patterns; a stale or unreadable file is
ignored with a warning. The kernels' tile choices are cached by Triton itself (autotune's
`cache_results`, in Triton's cache directory, TRITON_CACHE_DIR).

Choices made without measuring (`_rule`):
- FASTUNET_BACKEND=fastunet runs fastunet's ops everywhere; =torch runs them with the torch
  composite inside (for bisecting);
- TRITON_INTERPRET=1 runs the kernels: the interpreter is there to test them, not to be fast;
- on the CPU, PyTorch's own path: fastunet's CPU path is those aten calls plus the op layer's
  overhead, and the `_C` max-pool twin is slower than aten's (it stays the oracle that the CUDA
  kernel's logic is tested against);
- on meta tensors (shapes without data, as FLOP counting uses), PyTorch's own path;
- inside torch.compile, a torch.jit trace, a CUDA graph capture, a functorch transform (vmap),
  a dispatch mode (FlopCounterMode), a torch-function mode or a profiler nothing is timed: a
  cached choice, else the fastunet op (under torch.compile, always the fastunet op);
- where timing runs the GPU out of memory (a model that fills it), PyTorch's own path, kept in
  this process and not saved;
- under `torch.use_deterministic_algorithms`, a bilinear upsample's training pass on CUDA runs
  fastunet's kernel (`_deterministic_rule`): PyTorch's CUDA bilinear backward has no deterministic
  implementation (it raises, or warns with warn_only), fastunet's gathers in a fixed order.

Where the CPU rule holds, a whole model's activations can still run in either memory format:
oneDNN's convolutions are faster in channels_last for some shapes and passes and in NCHW for
others, so `choose_layout` times the model in both on its first call of a shape and keeps the
faster, in the same cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import json
import os
import platform
import re
import stat
import sys
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

try:
    import fcntl
except ImportError:  # Windows: saves are not locked across processes
    fcntl = None

from fastunet import kernels
from fastunet._version import __version__
from fastunet.kernels import INTERPRET
from fastunet.ops._backend import choose, forced_backend, native_extension, package_version
from fastunet.ops._common import (
    CHANNELS_LAST,
    in_functorch_transform,
    in_memory_format,
    memory_format_of,
    watched,
    write_atomically,
)
from fastunet.ops._eager import call
from fastunet.ops._timing import compare_ms

FORMAT = 2  # 1: one JSON object, rewritten at each save
PATHS = ("fastunet", "torch")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": CHANNELS_LAST}
# A model's layout choice is keyed "<model>-layout" where a layer's choice names its op.
LAYOUT_SUFFIX = "-layout"
# What an unusable cache file means; not "measuring again": `fastunet info` reads it too.
IGNORED = "its choices are ignored (each layer measures its own again when it runs)"


@dataclass(frozen=True)
class Choice:
    path: str  # "fastunet" or "torch" (PyTorch's own path); a layout choice: a LAYOUTS name
    reason: str
    times_ms: dict[str, float] | None = None


CHOICE_FIELDS = {field.name for field in fields(Choice)}


def _torch_conv2d_relu(x, weight, bias=None, padding=1, relu=True, negative_slope=0.0):
    out = F.conv2d(x, weight, bias, padding=padding)
    if not relu:
        return out
    # In place where autograd does not record: the conv's output is ours alone, so this saves
    # an allocation. Where it records, not: selective activation checkpointing may have
    # cached that output (a policy that saves convolutions) and refuses a change to it. Nor in
    # a jit trace, whose check traces again without grad and compares the graphs.
    recording = torch.is_grad_enabled() and out.requires_grad
    in_place = not (recording or torch.jit.is_tracing())
    if negative_slope:
        return F.leaky_relu(out, negative_slope, inplace=in_place)
    return F.relu(out, inplace=in_place)


def _torch_upsample_concat(x, skip, mode="nearest", align_corners=False, skip_first=True):
    # The plain composite: writing an exact 2x nearest upsample straight into the concat was
    # slower on the CPU at small sizes, and no faster in the benchmark at 256x256 (2026-12-07).
    aligned = None if mode == "nearest" and not align_corners else align_corners  # None: unset
    up = F.interpolate(x, size=skip.shape[-2:], mode=mode, align_corners=aligned)
    return torch.cat([skip, up] if skip_first else [up, skip], 1)


def _torch_max_pool2d(x):
    return F.max_pool2d(x, 2)


def _torch_upsample_concat_conv2d_relu(x, skip, weight, bias, padding, relu, mode, align_corners):
    concat = _torch_upsample_concat(x, skip, mode, align_corners)
    return _torch_conv2d_relu(concat, weight, bias, padding, relu)


# PyTorch's own path for each op: exactly the composite the op's contract names.
TORCH_PATHS = {
    "conv2d_relu": _torch_conv2d_relu,
    "upsample_concat": _torch_upsample_concat,
    "max_pool2d": _torch_max_pool2d,
    "upsample_concat_conv2d_relu": _torch_upsample_concat_conv2d_relu,
}

CPU_CHOICE = Choice(
    "torch",
    "CPU: PyTorch's own path (fastunet's CPU path is the same aten calls plus the op layer's "
    "overhead; the _C max-pool twin is slower than aten's)",
)
INTERPRETER_CHOICE = Choice("fastunet", "TRITON_INTERPRET=1: the kernels run, to be tested")
OUT_OF_MEMORY_CHOICE = Choice(
    "torch", "not measured: the GPU ran out of memory while timing both paths (not saved)"
)
DETERMINISTIC_CHOICE = Choice(
    "fastunet",
    "torch.use_deterministic_algorithms: PyTorch's CUDA bilinear upsample backward is not "
    "deterministic, fastunet's is",
)
# Where each upsampling op takes its mode: PyTorch's path for these has a nondeterministic
# backward on CUDA when the mode is bilinear.
MODE_ARGUMENT = {"upsample_concat": 2, "upsample_concat_conv2d_relu": 6}
NOT_TAKEN_CHOICE = Choice(
    "torch",
    "an input fastunet's ops do not take (unbatched, not floating point, no channels, "
    "tensors of several dtypes outside autocast): "
    "PyTorch's path, which takes it as torch.nn's layers do or says why not",
)
META_CHOICE = Choice(
    "torch",
    "meta tensor: no data to time; PyTorch's path, whose calls FlopCounterMode and other "
    "tracers of aten know",
)


# ---------------------------------------------------------------- the cache on disk


def cache_dir() -> Path:
    """FASTUNET_CACHE_DIR, else $XDG_CACHE_HOME/fastunet, else ~/.cache/fastunet."""
    configured = os.environ.get("FASTUNET_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastunet"


@functools.cache
def stamp() -> dict:
    """What a measured choice depends on besides its key: a change in any makes a file stale."""
    sources = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        sources.update(path.read_bytes())
    ext = native_extension()
    if not isinstance(ext, str):
        # The built library's size and time, not its bytes: hashing megabytes cost a new
        # process's first forward about 5 ms, and a rebuild changes both.
        built = Path(ext.__file__).stat()
        sources.update(f"{built.st_size}:{built.st_mtime_ns}".encode())
    return {
        "format": FORMAT,
        "fastunet": __version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "kernels": sources.hexdigest()[:16],
    }


class ChoiceCache:
    """The measured choices for one device, in a file of JSON lines: the stamp, then one line
    per choice, appended when it is made. (Rewriting the whole file for each choice cost 0.1 s
    a choice at 6,000 choices, about 100 model shapes on a GPU, and 1.2 s at 60,000.) Read once,
    on first use; each save first reads the lines other processes have appended since."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict] | None = None
        self._warned_unsaved = False
        # Threads of one process share this cache and its temporary file: one reads or writes
        # at a time.
        self._lock = threading.RLock()
        # How much of which file this process has read: (st_dev, st_ino), its first line (the
        # stamp and a nonce: an inode number is reused, and cp writes into the old inode), and
        # bytes. None: no usable file (none yet, stale, unreadable): the next save writes one.
        self._file: tuple[int, int] | None = None
        self._header = b""
        self._read_up_to = 0
        self._saved: set[str] = set()  # the keys in the file
        self._unsaved: list[str] = []  # keys whose save failed

    @property
    def save_failed(self) -> bool:
        """Whether a choice made is not in the file (fastunet tune says so)."""
        return bool(self._unsaved)

    @property
    def entries(self) -> dict[str, dict]:
        with self._lock:
            if self._entries is None:
                self._entries = {}
                self._read_new_lines(self.path, warn=True)
        return self._entries

    def _read_new_lines(self, path: Path, warn: bool) -> None:
        """Take into `entries` the choices in the file that this process has not read: from
        where it stopped, or from the start if the file was replaced. Where the file is stale or
        unusable, nothing (the next save writes a new one)."""
        try:
            # Not blocking: a FIFO would wait for a writer.
            with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
                status = os.fstat(handle.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise OSError("not a regular file")
                start = self._read_up_to if self._appended_to(handle, status) else 0
                handle.seek(start)
                data = handle.read()
        except FileNotFoundError:
            self._file = None
            return
        except OSError as error:
            self._file = None
            if warn:
                _warn(f"cannot read the choice cache {self.path} ({error}); {IGNORED}")
            return
        # The piece after the last newline is a line being written, or one a crash cut short;
        # unless it is whole: a last line saved without its newline (by an editor).
        *lines, unfinished = data.split(b"\n")
        unterminated = _is_json(unfinished)
        if unterminated:
            lines.append(unfinished)
            unfinished = b""
        if start == 0:
            self._file, self._saved = None, set()
            problem = _header_problem(lines[0] if lines else b"")
            if problem is not None:
                if warn:
                    _warn(f"the choice cache {self.path} {problem}; {IGNORED}")
                return
            self._header = lines[0] + b"\n"
            lines = lines[1:]
        found, unusable = {}, 0
        for line in lines:
            record = _record_in(line)
            if record is None:
                unusable += 1
            elif record[0] not in self._saved:
                found.setdefault(*record)  # the first saved counts, as its saver was told
        self._entries.update(found)  # the file's choice over one only in this process's memory
        self._saved.update(found)
        self._read_up_to = start + len(data) - len(unfinished)
        # With lines that are not choices, or one without its newline, the next save writes the
        # file again.
        self._file = None if unusable or unterminated else _file_identity(status)
        if unusable and warn:
            _warn(f"{unusable} lines of the choice cache {self.path} are not choices; they are "
                  "ignored")  # fmt: skip

    def _appended_to(self, handle, status: os.stat_result) -> bool:
        """Whether the open file is the one read up to `_read_up_to`, with lines appended (or
        none): else it was replaced, or changed in place, and is read from its start."""
        if self._file != _file_identity(status) or status.st_size < self._read_up_to:
            return False
        handle.seek(0)
        if handle.read(len(self._header)) != self._header:
            return False
        handle.seek(self._read_up_to - 1)
        return handle.read(1) == b"\n"  # where it stopped, a line ended

    def get(self, key: str) -> Choice | None:
        """The saved choice for key (of the key's kind: `_record_in` checked it)."""
        entry = self.entries.get(key)
        return None if entry is None else Choice(**entry)

    def put(self, key: str, choice: Choice) -> Choice:
        """Save choice for key, and return it; or the choice another process saved for key
        first (processes started together then take the same paths, so give the same bits)."""
        with self._lock:
            entries = self.entries
            try:
                # Through a symbolic link to the file it names (a cache shared that way stays so).
                target = _resolve(self.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                with _one_process_at_a_time(target):  # else two appends could interleave
                    self._read_new_lines(target, warn=False)
                    if key in self._saved:
                        return Choice(**entries[key])
                    entries[key] = asdict(choice)
                    self._save(target, [*self._unsaved, key])
                    self._unsaved = []
            except OSError as error:
                entries[key] = asdict(choice)
                self._unsaved.append(key)
                if not self._warned_unsaved:
                    _warn(
                        f"cannot save the choice cache {self.path} ({error}); keeping it in memory"
                    )
                self._warned_unsaved = True
        return choice

    def _save(self, target: Path, keys: list[str]) -> None:
        """Append the entries of `keys`, or write a new file with every entry where there is
        no usable one."""
        fresh = self._file is None
        if fresh:
            keys = list(self._entries)
        lines = "".join(
            json.dumps({"key": key, "choice": self._entries[key]}) + "\n" for key in keys
        )
        if fresh:
            header = json.dumps({"stamp": stamp(), "file": uuid.uuid4().hex}) + "\n"
            write_atomically(target, header + lines)
            self._header, size = header.encode(), target.stat().st_size
        else:
            with open(target, "a+b") as handle:
                end = handle.seek(0, os.SEEK_END)
                if fcntl is not None:  # locked: past what was read lies only a crash's piece
                    handle.truncate(self._read_up_to)
                    newline = False
                else:  # unlocked: another process may have appended lines since
                    handle.seek(end - 1)
                    newline = handle.read(1) != b"\n"
                handle.write(b"\n" * newline + lines.encode())
                size = handle.tell()
        self._file, self._read_up_to = _file_identity(target.stat()), size
        self._saved.update(keys)


def _file_identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _resolve(path: Path) -> Path:
    """path.resolve(), with a loop of symbolic links an OSError, as on Python 3.13 (before, a
    RuntimeError)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


def _header_problem(line: bytes) -> str | None:
    """Why the first line of a cache file makes it unusable, or None."""
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        header = None
    if not isinstance(header, dict) or "stamp" not in header:
        return "is not in the expected form"
    if header["stamp"] != stamp():
        return f"was made by {_stamp_changes(header['stamp'])}"
    return None


def _record_in(line: bytes) -> tuple[str, dict] | None:
    """(key, choice) of a line of a cache file, or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.keys() != {"key", "choice"}:
        return None
    key, entry = record["key"], record["choice"]
    return (key, entry) if isinstance(key, str) and _is_choice(key, entry) else None


@contextlib.contextmanager
def _one_process_at_a_time(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock, where the OS has flock (not Windows)."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_choice(key: str, entry) -> bool:
    """An entry `Choice(**entry)` rebuilds, its fields and nothing else, whose path is of key's
    kind (a layout for a model's layout, a layer's path for a layer)."""
    if not isinstance(entry, dict) or not entry.keys() <= CHOICE_FIELDS:
        return False
    times = entry.get("times_ms")
    if times is not None and not (
        isinstance(times, dict) and all(isinstance(t, int | float) for t in times.values())
    ):
        return False
    return entry.get("path") in _paths_for(key) and isinstance(entry.get("reason"), str)


def _paths_for(key: str):
    """The paths a choice for key takes: LAYOUTS for a model's layout, else PATHS."""
    parts = key.split("|", 2)
    return LAYOUTS if len(parts) > 1 and parts[1].endswith(LAYOUT_SUFFIX) else PATHS


def _stamp_changes(old) -> str:
    if not isinstance(old, dict):
        return "an unknown version"
    now = stamp()
    changed = [f"{k} {old.get(k)} (now {now[k]})" for k in now if old.get(k) != now[k]]
    return ", ".join(changed) or "another version"


# Code whose lines a warning does not point at: the user's line that called into it is the one
# to see. (fastunet.kernels lies apart from fastunet in an editable install.)
_INTERNAL = tuple(
    str(folder) + os.sep
    for folder in (Path(torch.__file__).parent, Path(__file__).parents[1],
                   Path(kernels.__file__).parent)
)  # fmt: skip


def _warn(message: str) -> None:
    """A RuntimeWarning that points at the first line outside fastunet and torch."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"fastunet: {message}", RuntimeWarning, stacklevel=level)


@functools.cache
def cpu_model() -> tuple[str, tuple[str, ...]]:
    """The CPU's model name and the instruction sets that set its bf16 speed (Linux's
    /proc/cpuinfo; elsewhere the platform's name): CPU timings from two machines of one
    architecture can differ several times over."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name") or platform.processor() or platform.machine() or "cpu"
    flags = fields.get("flags", "").split()
    return name, tuple(flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags)


@functools.cache
def device_name(device: torch.device) -> str:
    """What a measured choice was measured on: the GPU's name, or the CPU's model (a home
    directory shared by machines with other CPUs keeps a file for each)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = cpu_model()
    return ", ".join([name, *flags])


def cache_file(device: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    return cache_dir() / f"choices-{slug}.jsonl"


_caches: dict[Path, ChoiceCache] = {}
# Every choice made in this process, by call_key: a key is measured or read once.
_decided: dict[tuple, Choice] = {}
# The (key, choice) of each call while `recording()` is active, else None.
_recording: list[tuple[str, Choice]] | None = None
# True while a model runs whose every layer takes PyTorch's path by the CPU rule
# (`pytorch_by_rule`): its layers skip the per-call choice, which in a forward costs about
# 10 us a layer, as much as a small layer's own aten call.
_by_rule = contextvars.ContextVar("fastunet_pytorch_by_rule", default=False)


def cache_for(device: torch.device) -> ChoiceCache:
    path = cache_file(device)
    if path not in _caches:
        _caches[path] = ChoiceCache(path)
    return _caches[path]


# ---------------------------------------------------------------- the choice


def _is_training(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _describe(value) -> str:
    if isinstance(value, Tensor):
        shape = "x".join(map(str, value.shape))
        cl = value.dim() == 4 and memory_format_of(value) is CHANNELS_LAST
        return shape + ("-nhwc" if cl else "")
    return str(value)


def layer_key(op: str, args: tuple) -> str:
    """(device name, op, pass, dtype [+ autocast], each argument's shape and layout or value)."""
    return _text_key(op, args[0], _is_training(args), [_describe(a) for a in args])


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _text_key(name: str, x: Tensor, training: bool, described: list[str]) -> str:
    parts = [device_name(x.device), name, "forward+backward" if training else "forward"]
    parts.append(str(x.dtype).removeprefix("torch."))
    if autocast := _autocast_dtype(x.device):
        parts[-1] += "-autocast-" + str(autocast).removeprefix("torch.")
    return "|".join(parts + described)


def measure(op: str, fastunet_fn: Callable, args: tuple) -> dict[str, float]:
    """Median ms of the fastunet op and of PyTorch's own path on these inputs: forward alone,
    or forward and backward to the inputs that need gradients when the call records autograd."""
    candidates = {"fastunet": functools.partial(call, fastunet_fn), "torch": TORCH_PATHS[op]}
    device = args[0].device
    if not _is_training(args):
        with torch.no_grad():
            steps = {name: lambda _, fn=fn: fn(*args) for name, fn in candidates.items()}
            return compare_ms(steps, 1, device)
    # Fresh leaves, so the caller's tensors gather no gradient; ones as the output gradient,
    # so the random number stream is left as it was.
    leaves = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a
                   for a in args)  # fmt: skip
    needs_grad = [a for a in leaves if isinstance(a, Tensor) and a.requires_grad]
    grad_out = torch.ones_like(call(fastunet_fn, *leaves))

    def step(fn):
        torch.autograd.grad(fn(*leaves), needs_grad, grad_out)

    return compare_ms(
        {name: lambda _, fn=fn: step(fn) for name, fn in candidates.items()}, 1, device
    )


def _rule(op: str, x: Tensor) -> Choice | None:
    """The choices made without measuring (see the module docstring), or None."""
    forced = forced_backend()
    if forced != "auto":
        return Choice("fastunet", f"forced by FASTUNET_BACKEND={forced}")
    if x.device.type == "cpu":
        return INTERPRETER_CHOICE if INTERPRET else CPU_CHOICE
    if x.device.type == "meta":
        return META_CHOICE
    return None


def _deterministic_rule(op: str, args: tuple) -> Choice | None:
    """fastunet's kernel where deterministic algorithms are asked for and PyTorch's path has
    none (see the module docstring), else None."""
    x = args[0]
    if (
        op in MODE_ARGUMENT
        and args[MODE_ARGUMENT[op]] == "bilinear"
        and x.device.type == "cuda"
        and torch.are_deterministic_algorithms_enabled()
        and _is_training(args)
        and choose(op, x.device, x.dtype).is_triton
    ):
        return DETERMINISTIC_CHOICE
    return None


@contextlib.contextmanager
def pytorch_by_rule() -> Iterator[None]:
    """Inside, every layer runs PyTorch's path without asking: for a model that has checked
    `runs_pytorch_by_rule` on its input, whose layers all run on that input's device."""
    token = _by_rule.set(True)
    try:
        yield
    finally:
        _by_rule.reset(token)


def inside_pytorch_by_rule() -> bool:
    """Whether this call runs inside `pytorch_by_rule()`: a model's replaced layers may then run
    as written. Never while torch.compile traces (which cannot read the ContextVar), nor while
    `recording()`, which the layers' choices must reach."""
    return not torch.compiler.is_compiling() and _by_rule.get() and _recording is None


def runs_pytorch_by_rule(x: Tensor) -> bool:
    """Whether every layer on x's device runs PyTorch's own path without measuring (the CPU
    rule): a caller may then run the layers it replaced as they were written."""
    return _rule("conv2d_relu", x) is CPU_CHOICE


def _cannot_time(device: torch.device) -> bool:
    """Where timing runs would be recorded, refused or counted: a torch.jit trace, a CUDA graph
    capture, a functorch transform (vmap, grad), a dispatch mode (FlopCounterMode...), a
    torch-function mode, a profiler, or with saved-tensor hooks turned off (timing hides its
    graphs from the caller's: `_unseen`)."""
    return (
        torch.jit.is_tracing()
        or in_functorch_transform()
        or torch._C._len_torch_dispatch_stack() > 0
        or _in_torch_function_mode()
        or torch._C._autograd._profiler_enabled()  # torch.profiler, torch.autograd.profiler
        or not torch._C._autograd._saved_tensors_hooks_is_enabled()
        or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    )


def _in_torch_function_mode() -> bool:
    """Whether a TorchFunctionMode sees the calls made here, other than `torch.device(...)` or
    `torch.set_default_device`'s, which only picks the device of new tensors (as torch's own
    checkpoint treats it)."""
    return any(not isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _unseen():
    """Timing runs' autograd graphs out of sight of the caller's saved-tensor hooks (a
    non-reentrant checkpoint counts the tensors its region saves): the innermost hooks apply."""
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def call_key(op: str, args: tuple) -> tuple:
    """What layer_key says, as a tuple that is about half as costly to build: each call looks
    its choice up by it (strides stand in for the layout, so it can only be finer)."""
    x = args[0]
    described = ((a.dtype, a.shape, a.stride()) if isinstance(a, Tensor) else a for a in args)
    return (op, x.device, _is_training(args), _autocast_dtype(x.device), *described)


def choose_path(op: str, fastunet_fn: Callable, args: tuple) -> Choice:
    """Which path runs this call of `op`: a rule, this process's earlier choice, the cache on
    disk, or a measurement now (which is then saved)."""
    x = args[0]
    rule = _rule(op, x) or _deterministic_rule(op, args)
    if rule is not None:
        return rule if rule.path == "torch" or _op_takes(args) else NOT_TAKEN_CHOICE
    memo = call_key(op, args)
    if memo in _decided:  # every call after a key's first stops here
        return _decided[memo]
    if not _op_takes(args):
        choice = NOT_TAKEN_CHOICE
    elif (backend := choose(op, x.device, x.dtype)).name in ("torch", "unsupported"):
        choice = Choice("torch", f"no fastunet kernel serves it: {backend.reason}")
    else:
        key = layer_key(op, args)
        try:
            choice = _saved_or_measured(key, x.device, lambda: measure(op, fastunet_fn, args))
        except torch.cuda.OutOfMemoryError:
            # Timing needs memory the step itself does not (a second forward and backward of
            # the layer, do_bench's 256 MB L2 flush): a model that fills the GPU runs the path it
            # would have run without fastunet. Kept in this process, not saved.
            choice = OUT_OF_MEMORY_CHOICE
        except kernels.IndexRangeError as error:  # raised before any launch
            choice = Choice("torch", f"beyond fastunet's kernels: {error}")
    if choice is None:
        return Choice(
            "fastunet",
            "not measured yet, and nothing is timed here (a trace, a CUDA graph capture, vmap, "
            "a dispatch or torch-function mode, a profiler)",
        )
    _decided[memo] = choice
    return choice


def _saved_or_measured(key: str, device: torch.device, timings) -> Choice | None:
    """The choice saved for key, else the fastest of `timings()` (name -> ms, or None where the
    caller would see the runs), saved now; None where nothing can be timed. Ties go to the later
    name: PyTorch's own path for a layer."""
    cache = cache_for(device)
    choice = cache.get(key)
    if choice is None and not _cannot_time(device):
        with _unseen():
            times = timings()
        if times is None:  # the caller would see the runs
            return None
        path = min(reversed(times), key=times.get)
        reason = "measured: " + ", ".join(f"{name} {t:.4g} ms" for name, t in times.items())
        choice = cache.put(key, Choice(path, reason, times))
    return choice


def run_layer(op: str, fastunet_fn: Callable, *args):
    """`fastunet_fn(*args)` or PyTorch's own path for `op`, as this layer's choice says."""
    if torch.compiler.is_compiling() or symbolic(args[0]):  # traced: the op goes in the graph
        return (fastunet_fn if _op_takes(args) else TORCH_PATHS[op])(*args)
    if inside_pytorch_by_rule():
        return TORCH_PATHS[op](*args)
    choice = choose_path(op, fastunet_fn, args)
    _record(op, args, choice)
    if choice.path == "fastunet":
        return call(fastunet_fn, *args)
    return TORCH_PATHS[op](*args)


def symbolic(x) -> bool:
    """Whether x's sizes are symbols (make_fx's symbolic tracing, AOTAutograd without Dynamo):
    traced, not run, and no choice can be keyed by them."""
    return isinstance(x, Tensor) and any(isinstance(size, torch.SymInt) for size in x.shape)


def _op_takes(args: tuple) -> bool:
    """Whether fastunet's ops take these arguments: x a batched 4-D floating-point tensor with
    channels, and the other tensors of x's dtype unless autocast casts them all. A layer gives
    the rest (an unbatched image, an integer max-pool, no channels, an fp64 skip that
    torch.cat would promote to) to PyTorch's path, on every device (`NOT_TAKEN_CHOICE`), which
    takes it as torch.nn's layers do or says why not. Checked where a choice is made, not at
    every call: a call's key holds each tensor's shape and dtype."""
    x = args[0]
    if not (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point() and x.shape[1] > 0):
        return False
    return _autocast_dtype(x.device) is not None or all(
        a.dtype == x.dtype for a in args if isinstance(a, Tensor)
    )


def _record(op: str, args: tuple, choice: Choice) -> None:
    if _recording is not None:
        _recording.append((layer_key(op, args), choice))


def record_rule_call(op: str, args: tuple) -> None:
    """For a layer that ran PyTorch's path by the CPU rule without `run_layer`: `recording()`
    counts it as it counts the others."""
    _record(op, args, CPU_CHOICE)


def choose_layout(
    model: str,
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    module: torch.nn.Module,
    config: dict,
) -> torch.memory_format:
    """The memory format in which `run`, a whole model (`module`) whose layers all run PyTorch's
    path by the CPU rule, computes best on x: timed in both on the first call of a (model,
    config, device, pass, dtype, autocast, input shape, CPU threads) and kept, in this process
    and in the cache file. Not timed, but x's, where the timing runs would be seen: see
    `_cannot_time`, and hooks on the module (they would fire for each run).

    Why measured: oneDNN's convolutions are faster in channels_last for some shapes and passes,
    and in NCHW for others (on a 2-core x86 CPU, a UNet's inference ran 1.2-1.4x faster in
    channels_last, its training step at 256x256 about 1.05-1.1x faster in NCHW). The input's
    own layout is not in the key: an input gives the same bits in either layout. `config` must
    name what else the timing depends on (on the CPU, oneDNN computes channels_last whenever the
    weights are: their layout belongs in it).
    """
    # Not a list of the parameters on every call: gathering them costs about as much as a layer.
    training = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in module.parameters())
    )
    # oneDNN's best layout changes with the threads it has (OMP_NUM_THREADS, set_num_threads).
    settings = (*config.items(), ("threads", torch.get_num_threads()))
    memo = ("layout", model, x.device, training, _autocast_dtype(x.device), x.dtype, x.shape,
            settings)  # fmt: skip
    choice = _decided.get(memo)
    if choice is None or _recording is not None:
        described = ["x".join(map(str, x.shape)), *(f"{k}={v}" for k, v in settings)]
        key = _text_key(model + LAYOUT_SUFFIX, x, training, described)
    if choice is None:
        choice = _saved_or_measured(key, x.device, lambda: None if watched(module)
                                    else _measure_layouts(run, x, module, training))  # fmt: skip
        if choice is None:
            return memory_format_of(x)
        _decided[memo] = choice
    if _recording is not None:
        _recording.append((key, choice))
    return LAYOUTS[choice.path]


def _measure_layouts(run, x: Tensor, module, training: bool) -> dict[str, float]:
    """Median ms of `run` with x in each layout: forward alone, or forward and backward to the
    parameters that `run` reaches (a subclass may hold more) and x if it needs a gradient, on
    fresh leaves, so nothing gathers a gradient. The layer calls made while timing are not
    recorded."""
    global _recording
    leaves = {name: in_memory_format(x.detach(), layout).requires_grad_(x.requires_grad)
              for name, layout in LAYOUTS.items()}  # fmt: skip
    needs_grad = [p for p in module.parameters() if p.requires_grad]

    def step(leaf: Tensor) -> None:
        if not training:
            with torch.no_grad():
                run(leaf)
            return
        out = run(leaf)
        if out.requires_grad:  # not where only parameters that `run` does not reach train
            wrt = [*needs_grad, leaf] if leaf.requires_grad else needs_grad
            torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

    steps = {name: lambda _, leaf=leaf: step(leaf) for name, leaf in leaves.items()}
    outer, _recording = _recording, None
    try:
        return compare_ms(steps, 1, x.device)
    finally:
        _recording = outer


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, Choice]]]:
    """Collects the (key, choice) of every layer call made inside the block, and of every
    model's layout choice (`choose_layout`)."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer


def summarize(calls: list[tuple[str, Choice]]) -> dict[str, int]:
    """How many layer calls took each path, e.g. {"fastunet": 14, "torch": 9} (layout choices
    are not layer calls)."""
    counts = dict.fromkeys(PATHS, 0)
    for _, choice in calls:
        if choice.path in counts:
            counts[choice.path] += 1
    return counts


def describe(device: torch.device) -> dict:
    """For `fastunet info`: how layers on `device` are chosen, the layout UNet's activations
    take, and the cache behind both."""
    probe = torch.empty(0, device=device)
    rule = _rule("conv2d_relu", probe)
    path = cache_file(device)
    if device.type == "cuda":
        layout = "channels_last (the kernels' layout)"
    elif rule is CPU_CHOICE:
        layout = "NCHW or channels_last, whichever measures faster per input shape and pass"
    else:
        layout = "the input's"
    return {
        "rule": None if rule is None else f"{rule.path}: {rule.reason}",
        "unet_layout": layout,
        "cache_file": str(path),
        "cached": _cached_counts(device),
    }


def _cached_counts(device: torch.device) -> dict[str, dict[str, int]]:
    """How many of the cached choices for `device` took each path: the layers' and the models'
    layouts."""
    taken = Counter(entry["path"] for entry in cache_for(device).entries.values())
    return {
        "layers": {path: taken[path] for path in PATHS},
        "layouts": {layout: taken[layout] for layout in LAYOUTS},
    }
