"""Run the README's first command (`centerpoint train`, the built-in default experiment) from scratch and
report its wall time and final COCO metrics as one JSON line.

    python benchmarks/default_experiment.py [--workdir DIR] [--fresh-data] [-- extra train args]

The run goes into `--workdir` (which must be absent or empty; it is kept) or, by default, into a new
temporary directory that is removed afterwards. `--fresh-data` generates the dataset into a new temporary
cache directory (removed afterwards), so its generation time is included.

The target (issue: the functional core) is bbox_mAP >= 0.50 on the built-in val split within 600 s of
wall time on a 2-core CPU, dataset generation included when --fresh-data is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None, help="run directory (absent or empty; kept)")
    ap.add_argument("--fresh-data", action="store_true", help="generate the dataset in a new cache dir")
    ap.add_argument("extra", nargs="*", help="extra arguments for `centerpoint train`")
    args = ap.parse_args()
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        print(f"error: --workdir {args.workdir} is not empty; choose a new or empty directory", file=sys.stderr)
        sys.exit(2)
    created = []  # temporary directories made here, removed at the end (nothing else is)
    workdir = args.workdir
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="centerpoint-bench-run-"))
        created.append(workdir)
    env = dict(os.environ)
    if args.fresh_data:
        env["CENTERPOINT_CACHE"] = tempfile.mkdtemp(prefix="centerpoint-cache-")
        created.append(Path(env["CENTERPOINT_CACHE"]))
    try:
        cmd = [sys.executable, "-m", "centerpoint", "train", "--workdir", str(workdir), *args.extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        wall = time.perf_counter() - t
        records = []
        metrics_file = workdir / "metrics.jsonl"
        if metrics_file.exists():
            records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    finally:
        for directory in created:
            shutil.rmtree(directory, ignore_errors=True)
    last = records[-1] if records else {}
    out = {
        "bench": "default_experiment", "returncode": proc.returncode, "wall_s": round(wall, 1),
        "bbox_mAP": last.get("bbox_mAP"), "bbox_mAP_50": last.get("bbox_mAP_50"),
        "bbox_mAP_75": last.get("bbox_mAP_75"), "steps": last.get("step"), "epochs": last.get("epoch"),
        "first_step_s": last.get("first_step_s"),
        "history": [(r["epoch"], round(r["bbox_mAP"], 4)) for r in records],
        "target_mAP": 0.5, "target_wall_s": 600,
    }
    out["pass"] = bool(proc.returncode == 0 and (out["bbox_mAP"] or 0) >= 0.5 and wall <= 600)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
