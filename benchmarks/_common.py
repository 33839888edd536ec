"""Shared helpers of the benchmark scripts: CLI flags, timing, machine/noise info, tables, JSON.

Every script prints small plain-text tables and writes one JSON file (default
``benchmarks/results/<script>.json``) holding ``benchmark``, ``mode``, ``machine``, ``noise``,
``config``, ``tables`` (the printed text), the script's own result keys and ``wall_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

# Benchmarks run as commands, like the CLI: passive OpenMP waiting (see napari_unet/cli.py),
# set before any script imports torch. Importing napari_unet itself no longer sets it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The loaders of ../shared/data live with the scripts (a development tool, not in the wheel).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("smoke", "quick", "normal", "full")


def base_parser(description: str, *, full: bool = False) -> argparse.ArgumentParser:
    """Flags every script shares: run mode, device, threads, output path."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes, steps and budgets: only checks that the script runs")
    mode.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two)")
    if full:
        mode.add_argument("--full", action="store_true",
                          help="the large configuration (long on a 2-core CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default benchmarks/results/<script>.json)")
    return p


def mode_of(args: argparse.Namespace) -> str:
    """The run mode selected by the mutually exclusive flags."""
    for m in ("smoke", "quick", "full"):
        if getattr(args, m, False):
            return m
    return "normal"


def pick(mode: str, **by_mode: Any) -> Any:
    """``by_mode[mode]``, falling back to ``normal`` (e.g. ``full`` when not given)."""
    return by_mode.get(mode, by_mode["normal"])


def setup_torch(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (smoke runs default to 1: quick even on a busy machine); seed."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif mode_of(args) == "smoke":
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)


def sync(device: Any) -> None:
    """Wait for queued GPU work so wall-clock timings are honest."""
    import torch

    kind = getattr(device, "type", str(device))
    if kind.startswith("cuda"):
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    device: Any = "cpu",
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

    Round-robin spreads machine noise (other users) evenly over the contenders, so ratios
    measured in one process stay meaningful on a shared machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def median(values: Iterable[float]) -> float:
    """Median (nan for no values)."""
    values = list(values)
    return statistics.median(values) if values else math.nan


def spread(values: Iterable[float]) -> float:
    """(max - min) / median: how noisy repeated timings were."""
    values = list(values)
    if len(values) < 2:
        return 0.0
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else math.nan


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: Any = None) -> dict[str, Any]:
    """What the figures were measured on (CPU, threads, libraries, accelerator)."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_commit": _git_commit(),
    }
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        info[probe.strip("_").replace("is_", "").replace("_supported", "")] = (
            bool(fn()) if fn else None
        )
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


class NoiseMonitor:
    """Samples, once a second in a thread, how many cores *other* processes keep busy.

    On a shared machine this is the main source of timing noise; the mean and max go into
    every JSON file so figures can be judged against the load they were taken under.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_start = os.getloadavg()[0]

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        # cpu_percent() measures since the previous call on the *same* Process object, so
        # children (fresh benchmark processes) are tracked by pid across samples.
        tracked: dict[int, psutil.Process] = {me.pid: me}
        me.cpu_percent(None)
        psutil.cpu_percent(None)
        n = psutil.cpu_count() or 1
        while not self._stop.wait(self.interval):
            total = psutil.cpu_percent(None) / 100 * n
            mine = 0.0
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                if child.pid not in tracked:
                    tracked[child.pid] = child
                    mine += _lifetime_share(child)
            for pid, proc in list(tracked.items()):
                try:
                    mine += proc.cpu_percent(None) / 100
                except psutil.Error:
                    del tracked[pid]
            self.samples.append(max(total - mine, 0.0))

    def __enter__(self) -> NoiseMonitor:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Mean/max cores used by other processes, and the 1-minute load average."""
        s = self.samples
        return {
            "other_cores_mean": round(float(np.mean(s)), 2) if s else None,
            "other_cores_max": round(float(np.max(s)), 2) if s else None,
            "loadavg_1min_start": round(self.load_start, 2),
            "loadavg_1min_end": round(os.getloadavg()[0], 2),
        }


def _lifetime_share(proc: Any) -> float:
    """Cores a process just seen for the first time has used on average since it started
    (its first ``cpu_percent`` call only starts the clock)."""
    try:
        times = proc.cpu_times()
        age = max(time.time() - proc.create_time(), 1e-3)
    except Exception:
        return 0.0
    return (times.user + times.system) / age


def table(rows: list[dict], columns: list[str], title: str) -> str:
    """A titled plain-text table (napari_unet.evaluate.format_table) for printing and JSON."""
    from napari_unet.evaluate import format_table

    return f"{title}\n{format_table(rows, columns)}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def out_path(args: argparse.Namespace, name: str) -> Path:
    """Where the JSON goes: ``--out`` or benchmarks/results/<name>.json."""
    return Path(args.out) if args.out is not None else RESULTS_DIR / f"{name}.json"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write the results (non-finite floats become null) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"\nwrote {path}", flush=True)
    return path


def emit(text: str) -> None:
    """Print a table (flushed: run_all streams the output)."""
    print(f"\n{text}", flush=True)


def fmt(x: float, digits: int = 3) -> float:
    """Round for tables/JSON, keeping nan."""
    return round(float(x), digits) if math.isfinite(x) else math.nan


def python() -> str:
    """The interpreter running this script (children use the same one)."""
    return sys.executable


def nuclei_plane(size: int | tuple[int, int], seed: int = 0) -> np.ndarray:
    """A realistic uint16 fluorescence-nuclei plane of any size.

    Mirror-tiles the GOWT1 nuclei image of the shared data (rolled by a seeded offset and
    scaled to a 12-bit range with noise) so post-processing sees a real object density;
    falls back to synthetic blobs when the shared data is absent.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    base = _base_nuclei()
    reps = (-(-h // base.shape[0]) + 1, -(-w // base.shape[1]) + 1)
    tiled = np.block([[base[:: 1 - 2 * (i % 2), :: 1 - 2 * (j % 2)] for j in range(reps[1])]
                      for i in range(reps[0])])
    y0 = int(rng.integers(0, base.shape[0]))
    x0 = int(rng.integers(0, base.shape[1]))
    plane = tiled[y0 : y0 + h, x0 : x0 + w].astype(np.float32) * 16
    plane += rng.normal(100, 10, plane.shape).astype(np.float32)
    return np.clip(plane, 0, 65535).astype(np.uint16)


_BASE: list[np.ndarray] = []


def _base_nuclei() -> np.ndarray:
    if _BASE:
        return _BASE[0]
    try:
        from shared_data import load_dataset

        base = load_dataset("gowt1_nuclei")[0].image.astype(np.float32)
    except (FileNotFoundError, KeyError, OSError):
        from scipy import ndimage as ndi

        rng = np.random.default_rng(0)
        seeds = np.zeros((512, 512), np.float32)
        seeds[tuple(rng.integers(0, 512, (2, 150)))] = 1
        base = ndi.gaussian_filter(ndi.maximum_filter(seeds, 15), 2) * 120
    _BASE.append(base)
    return base


def training_sample(seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, instance labels, name): the first GOWT1 image, or synthetic disks without data."""
    try:
        from shared_data import load_dataset

        s = load_dataset("gowt1_nuclei")[0]
        return s.image, s.labels, f"gowt1_nuclei/{s.name}"
    except (FileNotFoundError, KeyError, OSError):
        from skimage.draw import disk

        rng = np.random.default_rng(seed)
        labels = np.zeros((512, 512), np.int32)
        for i, (y, x) in enumerate(rng.integers(20, 492, (60, 2)), start=1):
            rr, cc = disk((y, x), int(rng.integers(8, 16)), shape=labels.shape)
            labels[rr, cc] = i
        image = (labels > 0) * 120.0 + rng.normal(20, 6, labels.shape)
        return np.clip(image, 0, 255).astype(np.uint8), labels, "synthetic disks"


def scripted_annotation(
    labels: np.ndarray,
    k: int,
    seed: int = 0,
    *,
    ring: tuple[int, int] = (2, 5),
    n_strokes: int = 5,
    stroke_length: int = 40,
    min_area: int = 30,
) -> np.ndarray:
    """A scripted sparse annotation of one image, as a person would paint it in napari.

    ``k`` ground-truth objects of at least ``min_area`` pixels, drawn in a seeded random order
    (so the 5 cells of k=5 are among the 10 of k=10), are painted whole with values >= 2;
    a background ring ``ring[0]..ring[1]`` pixels outside each painted cell and
    ``n_strokes`` straight 3-pixel-wide background strokes of ``stroke_length`` pixels are
    painted 1, both only on true background at least 2 pixels away from any object.
    0 stays "not annotated".
    """
    from scipy import ndimage as ndi
    from skimage.draw import line

    from napari_unet.targets import BACKGROUND, FIRST_CELL

    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(np.bincount(labels.ravel()) >= min_area)
    ids = rng.permutation(ids[ids > 0])[:k]
    ann = np.zeros(labels.shape, np.int32)
    for i, lab in enumerate(ids):
        ann[labels == lab] = FIRST_CELL + i
    safe_bg = ~ndi.binary_dilation(labels > 0, iterations=2)
    cells = ann >= FIRST_CELL
    outer = ndi.binary_dilation(cells, iterations=ring[1])
    inner = ndi.binary_dilation(cells, iterations=max(ring[0] - 1, 0)) if ring[0] > 1 else cells
    ann[outer & ~inner & safe_bg] = BACKGROUND
    h, w = labels.shape
    stroke_rng = np.random.default_rng(seed + 1)
    candidates = np.flatnonzero(safe_bg)
    strokes = np.zeros(labels.shape, bool)
    for _ in range(n_strokes if len(candidates) else 0):
        y0, x0 = divmod(int(stroke_rng.choice(candidates)), w)
        angle = stroke_rng.uniform(0, np.pi)
        y1 = int(np.clip(y0 + stroke_length * np.sin(angle), 0, h - 1))
        x1 = int(np.clip(x0 + stroke_length * np.cos(angle), 0, w - 1))
        rr, cc = line(y0, x0, y1, x1)
        strokes[rr, cc] = True
    strokes = ndi.binary_dilation(strokes, iterations=1) & safe_bg & (ann == 0)
    ann[strokes] = BACKGROUND
    return ann


def threading_probe(script: str, child_args: list[str], unit: str) -> list[dict]:
    """The script's ``--probe-child`` rate in fresh processes under three thread settings.

    torch's default thread count with OpenMP's default (spinning) wait policy, the same with
    ``OMP_WAIT_POLICY=PASSIVE`` (what the CLI and benchmarks set), and 1 thread. On a
    machine shared with other jobs, threads that spin at every op's barrier lose whole
    scheduler slices whenever one of them is descheduled; this shows how much that costs
    here and now.
    """
    # The CLI and _common set OMP_WAIT_POLICY=PASSIVE unless the variable is set. An empty value
    # keeps it out of the way and makes libgomp (which warns about it) use its own default.
    variants = [
        ("default threads, OMP default wait", {"OMP_WAIT_POLICY": ""}, 0),
        ("default threads, OMP_WAIT_POLICY=PASSIVE (napari-unet's default)",
         {"OMP_WAIT_POLICY": "PASSIVE"}, 0),
        ("1 thread", {}, 1),
    ]
    rows = []
    for label, extra, threads in variants:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra
        cmd = [sys.executable, script, "--probe-child", "--device", "cpu", "--threads",
               str(threads), *child_args]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode:
            rows.append({"setting": label, "error": res.stderr.strip()[-300:]})
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"setting": label, "threads": out["threads"], unit: round(out["rate"], 3),
                     "other_cores": out["noise"]["other_cores_mean"]})
    return rows
