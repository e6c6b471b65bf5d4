"""Device backends: everything that differs between `cpu`, `cuda` and `sdaa` (Teco) lives here.

Selection, device strings, the distributed process-group backend, whether the step is compiled, mixed
precision, synchronisation and memory statistics. Nothing else in the project branches on device type.
`torch_sdaa` is imported lazily, only when sdaa is asked for or probed; its stack ships torch 2.0, so the
sdaa code paths use nothing newer.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec, ResolvedSpec

DeviceName = Literal["cpu", "cuda", "sdaa"]
_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Backend:
    """A resolved device backend for one process."""

    name: DeviceName
    device_string: str  # "cpu", "cuda:1", "sdaa:0"; a string, since "sdaa" parses only once torch_sdaa is loaded
    dist_backend: str  # torch.distributed process-group backend
    compile_by_default: bool  # what runtime.compile=auto means here
    pin_memory: bool  # pinned host memory speeds host->device copies
    free_sync: bool  # reading a device scalar on the host costs nothing (no asynchronous queue to drain)
    augment_by_default: bool = False  # what data.augment_on=auto means: batched augmentation on the device
    default_workers: int = 0  # what data.workers=None means: data loader processes per device
    index: int = 0  # the card / GPU of this process among the visible ones
    compile_backend: str = "inductor"  # what runtime.compile_backend=None means: the torch.compile backend

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_string)

    @property
    def pin_memory_device(self) -> str:
        """DataLoader's `pin_memory_device`: torch 2.0 (the sdaa stack's) pins for CUDA unless told the
        device; later versions pin for the current accelerator and ignore it ("": the default)."""
        return "sdaa" if self.name == "sdaa" else ""

    def autocast(self, precision: str) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for the forward pass (`precision` already resolved); fp32 is a no-op."""
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = _PRECISIONS[precision]
        if self.name == "sdaa":
            vendor = getattr(getattr(torch.sdaa, "amp", None), "autocast", None)  # type: ignore[attr-defined]
            if vendor is not None:  # torch_sdaa's own amp (its stack's torch 2.0 autocast knows no "sdaa")
                return vendor(dtype=dtype)
        return torch.autocast(device_type=self.name, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""
        if self.name == "cuda":
            torch.cuda.synchronize(self.index)
        elif self.name == "sdaa":
            torch.sdaa.synchronize(self.index)  # type: ignore[attr-defined]

    def max_memory_mb(self) -> float:
        """Peak device memory allocated by this process, MiB (0 on cpu)."""
        if self.name == "cuda":
            return torch.cuda.max_memory_allocated(self.index) / 2**20
        if self.name == "sdaa":
            return torch.sdaa.max_memory_allocated(self.index) / 2**20  # type: ignore[attr-defined]
        return 0.0

    def reset_peak_memory(self) -> None:
        """Start a new peak for `max_memory_mb` (no-op on cpu)."""
        if self.name == "cuda":
            torch.cuda.reset_peak_memory_stats(self.index)
        elif self.name == "sdaa":
            torch.sdaa.reset_max_memory_allocated(self.index)  # type: ignore[attr-defined]

    def manual_seed(self, seed: int) -> None:
        """Seed this process's device random generator (the host's on cpu)."""
        if self.name == "cuda":
            torch.cuda.manual_seed(seed)
        elif self.name == "sdaa":
            torch.sdaa.manual_seed(seed)  # type: ignore[attr-defined]
        else:
            torch.manual_seed(seed)


def _import_sdaa() -> bool:
    """Import torch_sdaa (registers the 'sdaa' device with torch); False if it is not installed."""
    try:
        importlib.import_module("torch_sdaa")
    except ImportError:
        return False
    return hasattr(torch, "sdaa") and torch.sdaa.is_available()  # type: ignore[attr-defined]


def available(name: DeviceName) -> bool:
    """Whether a device of this kind can be used in this process."""
    if name == "cpu":
        return True
    if name == "cuda":
        return torch.cuda.is_available()
    return _import_sdaa()


def resolve_name(requested: str, probe: Callable[[DeviceName], bool] = available) -> DeviceName:
    """'auto' -> cuda if present, else sdaa, else cpu; an explicit name must be available."""
    if requested == "auto":
        for name in ("cuda", "sdaa"):
            if probe(name):
                return name  # type: ignore[return-value]
        return "cpu"
    if requested not in ("cpu", "cuda", "sdaa"):
        raise CenterpointError(f"--device {requested}: expected auto, cpu, cuda or sdaa")
    if not probe(requested):  # type: ignore[arg-type]
        hint = {"cuda": "no CUDA GPU is visible to torch",
                "sdaa": "torch_sdaa is not installed or no SDAA card is visible"}[requested]
        raise CenterpointError(f"--device {requested}: {hint}; use --device cpu or auto")
    return requested  # type: ignore[return-value]


def make_backend(name: DeviceName, local_rank: int = 0) -> Backend:
    """The backend for device kind `name`, using the card/core group `local_rank` of this machine."""
    if name == "cuda":
        return Backend(name="cuda", device_string=f"cuda:{local_rank}", dist_backend="nccl", compile_by_default=True,
                       pin_memory=True, free_sync=False, augment_by_default=True, default_workers=4,
                       index=local_rank)
    if name == "sdaa":
        # Tecorigin's own integrations: collectives through TCCL, pinned host memory, "inductor" named as the
        # compile backend (Triton is not supported there, so compiling stays opt-in until a card has been
        # measured), and the card's augmentation stays in the workers (no grid_sample to rely on).
        return Backend(name="sdaa", device_string=f"sdaa:{local_rank}", dist_backend="tccl", compile_by_default=False,
                       pin_memory=True, free_sync=False, augment_by_default=False, default_workers=4,
                       index=local_rank)
    return Backend(name="cpu", device_string="cpu", dist_backend="gloo", compile_by_default=False, pin_memory=False,
                   free_sync=True)


def register_dist_backend(backend: Backend) -> None:
    """Make the backend's process-group backend known to torch.distributed (sdaa: torch_sdaa registers
    tccl when imported; the others are built in)."""
    if backend.name == "sdaa":
        importlib.import_module("torch_sdaa")


class StepMode(enum.Enum):
    """How the train step runs, decided once per run from the backend and the compile setting
    (`step_mode`); the step builds its gradients, non-finite guard and optimizer update from it."""

    TRACED = "traced"  # torch.compile'd: gradients by torch.func.grad, a tensor-select guard, pure update
    EAGER = "eager"  # eager on an asynchronous device: autograd, a tensor-select guard (no host sync),
    # the optimizer's in-place kernel writing only into the step's own gradients
    EAGER_DONATING = "eager-donating"  # eager where reading a device scalar costs nothing (cpu): the step
    # reads `finite` and skips a bad update; otherwise the kernel updates params and state in place


def step_mode(backend: Backend, compiled: bool) -> StepMode:
    """The step mode of a run on `backend` (`compiled`: runtime.compile resolved to on)."""
    if compiled:
        return StepMode.TRACED
    return StepMode.EAGER_DONATING if backend.free_sync else StepMode.EAGER


def keep_freed_host_memory() -> bool:
    """Ask glibc to keep freed large blocks for reuse instead of unmapping them at once.

    A pure train step allocates fresh tensors for the new state every step; with glibc's defaults each
    large block is mmap'd and unmapped again, and every page is faulted in anew (measured: ~40% of the
    optimizer update's time on cpu). Raising the mmap and trim thresholds lets malloc recycle them.
    Returns whether the setting took (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = any(libc.mallopt(m_mmap_threshold, size) == 1 for size in (1 << 28, 1 << 25))
        return bool(ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError):
        return False


def device_count(name: DeviceName) -> int:
    """Devices of this kind visible to this process (cpu: 1, shared by any number of processes)."""
    if name == "cuda":
        return torch.cuda.device_count()
    if name == "sdaa":
        return torch.sdaa.device_count()  # type: ignore[attr-defined]
    return 1


def check_local_rank(name: DeviceName, local_rank: int, count: int) -> None:
    """Raise a clear error when this machine has no device for process `local_rank` (cpu processes share)."""
    if name != "cpu" and local_rank >= count:
        raise CenterpointError(f"local rank {local_rank} needs {name}:{local_rank}, but this machine shows "
                               f"{count} {name} device(s); start at most {count} processes per node "
                               f"(--nproc-per-node), or check which devices are visible ({VISIBLE_DEVICES[name]})")


# The variable each card's runtime reads to choose the devices a process sees (device_count counts those).
VISIBLE_DEVICES = {"cuda": "CUDA_VISIBLE_DEVICES", "sdaa": "SDAA_VISIBLE_DEVICES"}


def select_backend(requested: str = "auto", local_rank: int = 0) -> Backend:
    """Resolve and build the backend in one call."""
    name = resolve_name(requested)
    check_local_rank(name, local_rank, device_count(name))
    backend = make_backend(name, local_rank)
    if name == "cpu":
        keep_freed_host_memory()
    if name == "cuda":
        torch.cuda.set_device(local_rank)
    elif name == "sdaa":
        torch.sdaa.set_device(local_rank)  # type: ignore[attr-defined]
    return backend


def should_compile(backend: Backend, setting: str) -> bool:
    """runtime.compile: on/off as asked; auto follows the backend (cuda yes, cpu and sdaa no)."""
    if setting == "auto":
        return backend.compile_by_default
    return setting == "on"


def compile_backends() -> list[str]:
    """The torch.compile backends this torch offers (all tags, as Tecorigin's DeepSpeed accelerator lists them)."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def resolve_compile_backend(backend: Backend, setting: str | None,
                            offered: Callable[[], list[str]] = compile_backends) -> str:
    """runtime.compile_backend -> the torch.compile backend (None: the device's, inductor); an unknown name
    is a clear error that names the backends torch offers."""
    name = setting or backend.compile_backend
    available = offered()
    if name not in available:
        raise CenterpointError(f"runtime.compile_backend={name}: not a torch.compile backend here; this torch "
                               f"offers {', '.join(available)} (or set runtime.compile=off)")
    return name


def compile_step(fn: Callable[..., Any], backend_name: str, **kwargs: Any) -> Callable[..., Any]:
    """torch.compile `fn` with `backend_name`; a failure while compiling (at the first call, where torch
    compiles) becomes a clear error naming the offered backends, instead of a compiler traceback."""
    compiled = torch.compile(fn, backend=backend_name, **kwargs)
    state = {"first": True}

    def call(*args: Any) -> Any:
        if not state["first"]:
            return compiled(*args)
        try:
            out = compiled(*args)
        except Exception as err:  # noqa: BLE001 (any compiler failure; the message carries it)
            import torch._dynamo.exc as dynamo_exc

            if not isinstance(err, (dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError,
                                    dynamo_exc.Unsupported)):
                raise
            raise CenterpointError(f"torch.compile with backend {backend_name!r} failed: "
                                   f"{str(err).splitlines()[0][:300]}; backends this torch offers: "
                                   f"{', '.join(compile_backends())}; set runtime.compile_backend to one of them "
                                   "or runtime.compile=off") from None
        state["first"] = False
        return out

    return call


def loader_workers(backend: Backend, setting: int | None) -> int:
    """data.workers -> data loader processes per device (None: the backend's default)."""
    return backend.default_workers if setting is None else setting


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (a container's or
    `taskset`'s limit, which the machine's core count ignores), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def local_processes(env: Mapping[str, str] | None = None) -> int:
    """The job's processes on this machine (torchrun's and our launcher's LOCAL_WORLD_SIZE; 1 outside a
    launched job). Under srun each task has its own affinity mask already, so it counts as one."""
    env = os.environ if env is None else env
    return max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))


def cap_workers(asked: int, cores: int, processes: int) -> tuple[int, str | None]:
    """Loader workers per process: `asked`, at most this process's share of the cores (at least one).
    More only queue for the same cores (and torch warns at every loader start). Returns (workers, the
    note to print when capped, else None)."""
    share = max(1, cores // processes)
    if asked <= share:
        return asked, None
    per = f" shared by {processes} processes on this machine" if processes > 1 else ""
    return share, (f"data.workers={asked} but each process has {share} of {cores} usable CPU cores{per}: "
                   f"using {share} loader worker{'s' if share != 1 else ''} per process")


def resolve_workers(backend: Backend, setting: int | None) -> tuple[int, str | None]:
    """data.workers -> loader processes per device for this process: the backend's default when None,
    capped to its share of the cores (`cap_workers`). Returns (workers, a note when capped, else None)."""
    return cap_workers(loader_workers(backend, setting), usable_cores(), local_processes())


def augments_on_device(backend: Backend, setting: str) -> bool:
    """data.augment_on -> whether the train batches are augmented on the device (auto: on cuda only)."""
    return backend.augment_by_default if setting == "auto" else setting == "device"


def _bf16_supported(name: DeviceName) -> bool:
    if name == "cuda":
        return torch.cuda.is_bf16_supported()
    if name == "sdaa":
        return bool(torch.sdaa.is_bf16_supported())  # type: ignore[attr-defined]
    # oneDNN runs bf16 convolutions natively only on CPUs with AVX512-BF16 or AMX.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(backend: Backend, setting: str, bf16_ok: Callable[[DeviceName], bool] | None = None
                      ) -> str:
    """runtime.precision -> the autocast precision used. auto: bf16 where the device computes it natively
    (measured 1.8x faster than fp32 for the R18 step on an AVX512-BF16 cpu); else fp16 with the loss
    scaler on sdaa (every SDAA card computes fp16) and fp32 elsewhere. fp16 needs an accelerator."""
    bf16_ok = bf16_ok or _bf16_supported
    if setting == "auto":
        if bf16_ok(backend.name):
            return "bf16"
        return "fp16" if backend.name == "sdaa" else "fp32"
    if setting == "fp16" and backend.name == "cpu":
        raise CenterpointError("runtime.precision=fp16 needs cuda or sdaa; use bf16 or fp32 on cpu")
    if setting == "bf16" and not bf16_ok(backend.name):
        hint = "fp16 or fp32" if backend.name != "cpu" else "fp32"
        raise CenterpointError(f"runtime.precision=bf16: this {backend.name} device has no native bf16; use {hint}")
    return setting


def resolve_settings(spec: ExperimentSpec, local_rank: int = 0) -> tuple[Backend, ResolvedSpec, list[str]]:
    """The backend and the device-dependent settings a training run uses, with notes for the user.

    A setting given explicitly is used as asked. One left `auto` takes the value `spec.resolved` recorded (the
    spec.yaml of an earlier run: training from it again reproduces that run) when this machine can honour it;
    otherwise this machine resolves it, and a note says so."""
    rt, data, rec = spec.runtime, spec.data, spec.resolved
    notes: list[str] = []

    def recorded(name: str, setting: Any, check: Callable[[Any], None]) -> Any:
        """The recorded value of an auto `setting` when `check(value)` does not raise, else the setting."""
        if setting not in ("auto", None) or rec is None:
            return setting
        value = getattr(rec, name)
        try:
            check(value)
            return value
        except CenterpointError as err:
            notes.append(f"the spec records {name}={value} from the run it comes from, but this machine cannot "
                         f"use it ({err}); resolving it here instead")
            return setting

    def device_check(name: str) -> None:
        if not available(name):  # type: ignore[arg-type]
            raise CenterpointError(f"no {name} device")

    backend = select_backend(recorded("device", rt.device, device_check), local_rank)
    precision = resolve_precision(backend, recorded("precision", rt.precision,
                                                    lambda v: resolve_precision(backend, v)))
    compiled = should_compile(backend, recorded("compile", rt.compile, lambda v: should_compile(backend, v)))
    workers, capped = resolve_workers(backend, recorded("workers", data.workers, lambda v: None))
    notes += [capped] if capped else []
    on_device = augments_on_device(backend, recorded("augment_on", data.augment_on, lambda v: None))
    resolved = ResolvedSpec(device=backend.name, precision=precision, compile="on" if compiled else "off",
                            workers=workers, augment_on="device" if on_device else "workers")
    return backend, resolved, notes
