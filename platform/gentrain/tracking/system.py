"""System metrics for a run: CPU, memory, disk, network and GPU, sampled on rank 0's node.

    monitor = SystemMetrics(run_logger, interval_s=15, origin_ms=run_start_ms)
    monitor.start()
    ...
    monitor.stop()          # one last sample, so even a short run has a point

The readings are those of MLflow's monitors, under MLflow's names
(`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`, ...), so the
run's "System metrics" tab shows them. CPU, memory, disk and network are read here with
psutil, as MLflow's monitors read them: importing those would import MLflow into a worker
that hands its records to the driver (tracking.relay) and otherwise never imports it. The
NVIDIA and AMD GPU monitors are MLflow's, tried only where their library (`nvidia-ml-py`,
`pyrsmi`) is installed. They go through the RunLogger, not MLflow's own
SystemMetricsMonitor: that one sends from its thread and stops for good at the first
failed call, while the RunLogger queues, spools while the server is away and never
blocks or raises; training keeps its guarantee. Where NVML is missing and the run trains
on GPUs (`torch_gpu`), this rank's own GPU memory is read through torch (no utilisation).

The step of a point is the seconds since the MLflow run started: it keeps growing across
reruns of the same run (the logger drops a point whose step is not above the last one).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time

_log = logging.getLogger("gentrain.tracking")
PREFIX = "system/"


class _TorchGPUMemory:
    """This process's CUDA device's memory in use (every process on it), through torch."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA")
        self.device = torch.cuda.current_device()
        self.samples: dict[str, list[float]] = {}

    def collect_metrics(self) -> None:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        self.samples.setdefault(f"gpu_{self.device}_memory_usage_megabytes", []).append(used / 1e6)
        self.samples.setdefault(f"gpu_{self.device}_memory_usage_percentage", []).append(100 * used / total)

    def aggregate_metrics(self) -> dict[str, float]:
        return {key: round(sum(values) / len(values), 1) for key, values in self.samples.items() if values}

    def clear_metrics(self) -> None:
        self.samples = {}


class _Host:
    """CPU, memory, disk and network, read as MLflow's CPU, disk and network monitors read
    them: means over the samples of an interval; network bytes since the monitor started."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        network = psutil.net_io_counters()
        self.received0, self.sent0 = network.bytes_recv / 1e6, network.bytes_sent / 1e6
        self.samples: dict[str, list[float]] = {}
        self.network: dict[str, float] = {}

    def collect_metrics(self) -> None:
        psutil, add = self.psutil, self._add
        add("cpu_utilization_percentage", psutil.cpu_percent())
        memory = psutil.virtual_memory()
        add("system_memory_usage_megabytes", memory.used / 1e6)
        add("system_memory_usage_percentage", memory.used / memory.total * 100)
        disk = psutil.disk_usage(os.sep)
        add("disk_usage_percentage", disk.percent)
        add("disk_usage_megabytes", disk.used / 1e6)
        add("disk_available_megabytes", disk.free / 1e6)
        network = psutil.net_io_counters()
        self.network = {"network_receive_megabytes": network.bytes_recv / 1e6 - self.received0,
                        "network_transmit_megabytes": network.bytes_sent / 1e6 - self.sent0}

    def _add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def aggregate_metrics(self) -> dict[str, float]:
        means = {key: round(sum(values) / len(values), 1) for key, values in self.samples.items() if values}
        return {**means, **self.network}

    def clear_metrics(self) -> None:
        self.samples, self.network = {}, {}


def _monitors(torch_gpu: bool) -> list:
    monitors: list = [_Host()]
    gpu = None
    # MLflow's GPU monitors only where their library is there (importing them imports MLflow);
    # torch's reading opens a CUDA context: only where this rank trains on the GPU anyway.
    loaders = [loader for loader, library in ((_nvidia, "pynvml"), (_amd, "pyrsmi"))
               if importlib.util.find_spec(library) is not None]
    for loader in (*loaders, *((_TorchGPUMemory,) if torch_gpu else ())):
        try:
            gpu = loader()
            break
        except Exception:  # noqa: BLE001 - no such GPU, or no library to read it
            continue
    if gpu is not None:
        monitors.append(gpu)
    return monitors


def _nvidia():
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    return GPUMonitor()


def _amd():
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    return ROCMMonitor()


class SystemMetrics:
    """A daemon thread that samples every `interval_s` and logs through `run_logger`."""

    def __init__(self, run_logger, interval_s: float, origin_ms: int | None = None,
                 torch_gpu: bool = False):
        self.run_logger, self.interval_s, self.torch_gpu = run_logger, float(interval_s), torch_gpu
        self.origin = (origin_ms / 1000.0) if origin_ms else time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_step = -1
        self._monitors: list = []

    def start(self) -> "SystemMetrics":
        try:
            self._monitors = _monitors(self.torch_gpu)
            for monitor in self._monitors:  # psutil's first CPU reading is always 0: prime it
                monitor.collect_metrics()
                monitor.clear_metrics()
        except Exception:  # noqa: BLE001 - system metrics are never worth a run
            _log.warning("system metrics are off for this run: their monitors failed to start",
                         exc_info=True)
            return self
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gentrain-system-metrics")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        self._sample()  # the last stretch, so a run shorter than the interval has a point

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            metrics: dict[str, float] = {}
            for monitor in self._monitors:
                monitor.collect_metrics()
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            step = max(int(time.time() - self.origin), self._last_step + 1)
            self._last_step = step
            self.run_logger.log_metrics({PREFIX + key: value for key, value in metrics.items()}, step=step)
        except Exception:  # noqa: BLE001
            _log.warning("a system metrics sample failed; the next one is tried as usual", exc_info=True)
