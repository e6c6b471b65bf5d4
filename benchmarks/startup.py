"""CLI start-up: wall time of `centerpoint --help` (as `python -m centerpoint` and as the installed console
script) against a bare `python -c pass` measured in the same run, and the time a tiny `centerpoint train`
takes to reach its first optimizer step.

Each command runs --runs times; the JSON line gives medians and minimums of wall time and of the child's
CPU time (user + sys, less disturbed by other load on the machine), and the --help overhead over the
bare interpreter. The train runs use a fresh dataset cache: the first includes generating the tiny
synthetic dataset, the second reuses it. `first_step_s` is what the train loop records in metrics.jsonl
(from the start of training, after imports); `wall_s` is the whole command.

Targets (issue): `centerpoint --help` <= 0.3 s wall.

    python benchmarks/startup.py [--runs 7] [--no-train]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_TRAIN = ["train", "--set", "data.shapes_train=24", "--set", "data.shapes_val=8", "--set", "data.input_size=64",
              "--max-steps", "2"]


def run_once(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run of `cmd`; raises if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(commands: dict[str, list[str]], runs: int) -> dict[str, dict[str, float]]:
    """Median/min wall and CPU seconds per command, the commands interleaved run by run."""
    for cmd in commands.values():  # warm the file cache
        run_once(cmd)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            samples[name].append(run_once(cmd))
    out = {}
    for name, s in samples.items():
        wall, cpu = [x[0] for x in s], [x[1] for x in s]
        out[name] = {"wall_median_s": round(statistics.median(wall), 3), "wall_min_s": round(min(wall), 3),
                     "cpu_median_s": round(statistics.median(cpu), 3), "cpu_min_s": round(min(cpu), 3)}
    return out


def console_scripts() -> dict[str, list[str]]:
    """The installed `centerpoint` next to this interpreter, and the one on PATH if that is another file
    (e.g. a version manager's shim)."""
    found = {}
    beside = Path(sys.executable).parent / "centerpoint"
    if beside.is_file():
        found["console_script"] = [str(beside), "--help"]
    on_path = shutil.which("centerpoint")
    if on_path and (not beside.is_file() or not os.path.samefile(on_path, beside)):
        found["console_script_on_path"] = [on_path, "--help"]
    return found


def train_to_first_step(cache: Path, workdir: Path) -> dict[str, float | None]:
    """Run the tiny training once; its wall time and the loop's recorded timings."""
    env = dict(os.environ, CENTERPOINT_CACHE=str(cache))
    wall, cpu = run_once([sys.executable, "-m", "centerpoint", *TINY_TRAIN, "--workdir", str(workdir)], env)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    shutil.rmtree(workdir)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "first_step_s": round(record["first_step_s"], 2) if record.get("first_step_s") is not None else None,
            "eval_s": round(record.get("eval_s", float("nan")), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-train", action="store_true", help="skip the tiny training runs")
    args = ap.parse_args()
    commands = {"python_pass": [sys.executable, "-c", "pass"],
                "python_m_help": [sys.executable, "-m", "centerpoint", "--help"], **console_scripts()}
    result: dict[str, object] = {"bench": "startup", "runs": args.runs, **measure(commands, args.runs)}
    base = result["python_pass"]
    for name in ("python_m_help", "console_script"):
        if name in result:
            entry = result[name]
            entry["over_python_wall_s"] = round(entry["wall_median_s"] - base["wall_median_s"], 3)  # type: ignore[index]
            entry["over_python_cpu_s"] = round(entry["cpu_median_s"] - base["cpu_median_s"], 3)  # type: ignore[index]
    if not args.no_train:
        tmp = Path(tempfile.mkdtemp(prefix="centerpoint-bench-"))
        result["train_cold_cache"] = train_to_first_step(tmp / "cache", tmp / "run")
        result["train_warm_cache"] = train_to_first_step(tmp / "cache", tmp / "run")
        shutil.rmtree(tmp)
    help_wall = result["console_script"]["wall_median_s"] if "console_script" in result else \
        result["python_m_help"]["wall_median_s"]  # type: ignore[index]
    result["target_help_s"] = 0.3
    result["pass"] = bool(help_wall <= 0.3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
