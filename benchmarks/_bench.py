"""What every benchmark script shares: the machine it ran on, and the append-only results log."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def publish(text: str, results: Path = RESULTS, append: bool = True) -> None:
    """Print a result section and (unless ``append`` is false) append it to the results log."""
    sys.stdout.write(text + "\n")
    if append:
        with open(results, "a", encoding="utf-8") as f:
            f.write("\n" + text)


def machine() -> str:
    """The CPU, and the first CUDA GPU when torch sees one (the device a training run used)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {cpu_model()}"
    except ImportError:
        pass
    return cpu_model()


def torch_section(title: str, detail: str, lines: list[str]) -> str:
    """A results section of a torch benchmark: dated title, machine, threads, the command line, the table."""
    import datetime as dt

    import torch

    cmd = "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    return "\n".join(
        [
            f"## {title} - {dt.datetime.now():%Y-%m-%dT%H:%M}",
            "",
            f"Machine: {machine()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads. Command: `{cmd.strip()}`. {detail}",
            "",
            *lines,
        ]
    )
