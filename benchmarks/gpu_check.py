"""The stages of `benchmarks/gpu_check.sh` (which installs what is missing first, then runs this).

Each stage runs as its own process with a timeout, inside an overall time budget; whatever fails, times
out or is left out for lack of time is recorded, never raised. Each stage writes `<out>/<stage>.json`
({"stage", "ok", "rc", "seconds", "timed_out", "skipped", "result", "checks", "tail"}); the run ends with
`summary.json` and one line `GPU_CHECK_SUMMARY {...}` on stdout. At most 8 files are written (what a
device machine returns): setup, tests, alignment, nccl, experiment, train_step, data_pipeline, summary.

Stages, in order: setup (versions, GPU, measured matmul rates), tests (`pytest -m cuda`), alignment
(`cuda_alignment.py`), nccl (`centerpoint train --nproc-per-node 1`, the real launcher), train_step (the
recipe network at 512 px, batch 64 and 32, bf16 and fp32, baseline / eager / compiled), data_pipeline
(`data_pipeline.py --step`), experiment (the built-in experiment end to end; started in the background
right after setup, since it is the longest, and waited for before the timed stages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STAGES = ("setup", "tests", "alignment", "nccl", "experiment", "train_step", "data_pipeline")
CPU_MAP = 0.584  # the built-in experiment's final bbox_mAP on a cpu (README; benchmarks/default_experiment.py)
TINY = ["--set", "data.shapes_train=24", "--set", "data.shapes_val=8", "--set", "data.input_size=64",
        "--set", "data.test_size=64", "--set", "train.batch_size=8", "--set", "eval.batch_size=8",
        "--set", "logging.progress=false"]


def last_json(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


class Runner:
    """Runs commands against a deadline and writes each stage's JSON."""

    def __init__(self, out: Path, budget: float, env: dict[str, str]) -> None:
        self.out, self.deadline, self.env = out, time.monotonic() + budget, env
        self.records: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
        """Run `cmd` for at most min(timeout, time left); returns rc, seconds, timed_out, output."""
        limit = max(1.0, min(timeout, self.left()))
        t = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env or self.env, capture_output=True, text=True, timeout=limit)
            rc, text, timed_out = proc.returncode, proc.stdout + proc.stderr, False
            stdout = proc.stdout
        except subprocess.TimeoutExpired as err:
            rc, timed_out = None, True
            stdout = _text(err.stdout)
            text = stdout + _text(err.stderr)
        return {"rc": rc, "seconds": round(time.monotonic() - t, 1), "timed_out": timed_out, "stdout": stdout,
                "output": text, "limit_s": round(limit, 1)}

    def write(self, stage: str, ok: bool | None, run: dict | None = None, result: object = None,
              checks: dict | None = None, skipped: str | None = None) -> dict:
        record = {"stage": stage, "ok": ok, "skipped": skipped, "result": result, "checks": checks or {}}
        if run is not None:
            record.update(rc=run["rc"], seconds=run["seconds"], timed_out=run["timed_out"], limit_s=run["limit_s"],
                          tail=run["output"][-4000:])
        self.records[stage] = record
        (self.out / f"{stage}.json").write_text(json.dumps(record, indent=1, default=str))
        status = "skipped" if skipped else ("ok" if ok else "FAILED")
        print(f"[gpu_check] {stage}: {status} ({record.get('seconds', 0)} s)", flush=True)
        return record

    def skip(self, stage: str, why: str) -> dict:
        return self.write(stage, None, skipped=why)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


SETUP_PROBE = r"""
import json, sys, time, importlib
out = {"python": sys.version.split()[0]}
for name in ("torch", "numpy", "pydantic", "pycocotools", "cv2", "typer", "safetensors", "PIL", "triton"):
    try:
        m = importlib.import_module(name)
        out[name] = getattr(m, "__version__", "present")
    except Exception as err:
        out[name] = "MISSING: " + str(err)[:100]
import torch
dev = sys.argv[1]
out["cuda_available"] = torch.cuda.is_available()
if dev == "cuda" and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)),
               memory_gb=round(p.total_memory / 2**30, 1), torch_cuda=torch.version.cuda,
               bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
sys.path.insert(0, "benchmarks")
from train_step import matmul_peak
from centerpoint.runtime.devices import select_backend
backend = select_backend(dev)
for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    if dev == "cpu" and sys.argv[2] == "1":
        break
    torch.backends.cuda.matmul.allow_tf32 = False
    out[f"matmul_{name}_tflop_s"] = round(matmul_peak(backend.device, dtype, backend.synchronize) / 1e12, 2)
print(json.dumps(out))
"""


def stage_setup(r: Runner, device: str, quick: bool) -> None:
    run = r.run([PY, "-c", SETUP_PROBE, device, "1" if quick else "0"], 180)
    result = last_json(run["stdout"]) or {}
    result["wheels"] = os.environ.get("GPU_CHECK_WHEELS", "not run through gpu_check.sh")
    result["project"] = os.environ.get("GPU_CHECK_PROJECT", "not run through gpu_check.sh")
    log = os.environ.get("GPU_CHECK_SETUP_LOG")
    if log and Path(log).exists():
        result["setup_log_tail"] = Path(log).read_text(errors="replace")[-2000:]
    smi = shutil.which("nvidia-smi")
    if smi:
        q = r.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 30)
        result["nvidia_smi"] = q["output"].strip()
    help_run = r.run(["centerpoint", "--help"], 60) if shutil.which("centerpoint") else None
    checks = {"imports": not any(str(v).startswith("MISSING") for k, v in result.items() if k != "triton"),
              "gpu": device != "cuda" or bool(result.get("cuda_available")),
              "console_script": bool(help_run and help_run["rc"] == 0)}
    r.write("setup", run["rc"] == 0 and all(checks.values()), run, result, checks)


def stage_tests(r: Runner, device: str, quick: bool) -> None:
    env = dict(r.env)
    if device == "cpu":
        env["CENTERPOINT_TEST_DEVICE"] = "cpu"
    if quick:
        env["CENTERPOINT_TEST_QUICK"] = "1"
    # The cuda tests' own file: collecting the whole suite costs more than running these, and would import
    # what only the dev extra installs.
    run = r.run([PY, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rfEs",
                 "tests/test_cuda.py"], 240, env)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", run["output"])}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ok = run["rc"] == 0 and failed == 0 and counts.get("passed", 0) > 0
    r.write("tests", ok, run, counts, {"no_failures": failed == 0, "some_passed": counts.get("passed", 0) > 0})


def stage_alignment(r: Runner, device: str, quick: bool) -> None:
    size = ["--size", "64", "--batch", "4", "--steps", "2"] if quick else []
    run = r.run([PY, "benchmarks/cuda_alignment.py", "--device", device, *size], 150)
    result = last_json(run["stdout"])
    checks = {"fp32_loss_within_1e-5": bool(result and result.get("pass_fp32_loss"))}
    if result:
        checks["bf16_curves_within_5pct"] = result["bf16_curve_max_rel"] <= 0.05
    r.write("alignment", run["rc"] == 0 and all(checks.values()), run, result, checks)


def stage_nccl(r: Runner, device: str, quick: bool, work: Path) -> None:
    want = "nccl" if device == "cuda" else "gloo"
    cmd = ["centerpoint" if shutil.which("centerpoint") else PY, *([] if shutil.which("centerpoint") else
           ["-m", "centerpoint"]), "train", "--nproc-per-node", "1", "--device", device, "--max-steps", "3",
           "--workdir", str(work / "nccl"), "--set", "runtime.compile=off", *TINY]
    env = {**r.env, "CENTERPOINT_CACHE": str(work / "cache-nccl")}
    run = r.run(cmd, 150, env)
    group = f"({want} process group)" in run["output"]
    metrics = work / "nccl" / "metrics.jsonl"
    checks = {"exit_0": run["rc"] == 0, f"{want}_group_formed": group, "metrics_written": metrics.exists()}
    r.write("nccl", all(checks.values()), run, {"backend": want}, checks)


def start_experiment(device: str, quick: bool, work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    extra = ["--device", device] + (["--max-steps", "2", *TINY] if quick else [])
    cmd = [PY, "benchmarks/default_experiment.py", "--fresh-data", "--workdir", str(work / "experiment"), "--", *extra]
    log = open(work / "experiment.log", "w")  # noqa: SIM115 (closed by finish_experiment)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, time.monotonic()


def finish_experiment(r: Runner, proc: subprocess.Popen, started: float, work: Path, quick: bool,
                      timeout: float, concurrent: list[str]) -> None:
    try:
        proc.wait(timeout=max(1.0, min(timeout - (time.monotonic() - started), r.left())))
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    text = (work / "experiment.log").read_text(errors="replace")
    run = {"rc": proc.returncode if not timed_out else None, "seconds": round(time.monotonic() - started, 1),
           "timed_out": timed_out, "output": text, "limit_s": timeout}
    result = last_json(text) or {}
    result["concurrent_with"] = concurrent
    result["cpu_reference_mAP"] = CPU_MAP
    checks = {"exit_0": run["rc"] == 0}
    if not quick:
        got = result.get("bbox_mAP")
        checks["mAP_within_0.03_of_cpu"] = got is not None and abs(got - CPU_MAP) <= 0.03
    r.write("experiment", all(checks.values()), run, result, checks)


TRAIN_STEP_MATRIX = [(64, "bf16"), (32, "bf16"), (64, "fp32"), (32, "fp32")]


def train_step_args(device: str, quick: bool, batch: int, precision: str) -> list[str]:
    if quick:
        return [PY, "benchmarks/train_step.py", "--device", device, "--size", "64", "--batch", "2", "--steps", "1",
                "--rounds", "1", "--no-memory", "--channels-last", "--precision", "fp32"]
    return [PY, "benchmarks/train_step.py", "--spec", "experiments/centernet_r18_coco.yaml", "--device", device,
            "--size", "512", "--batch", str(batch), "--precision", precision, "--channels-last", "--compile",
            "--steps", "5", "--rounds", "2"]


def start_prewarm(device: str, quick: bool, env: dict[str, str]) -> list[subprocess.Popen]:
    """Compile the four train_step configurations at once, in the background (inductor caches the graphs
    on disk, so the timed runs later compile in seconds): compiling is host work, done while the GPU runs
    the correctness stages."""
    if quick or device != "cuda":
        return []
    return [subprocess.Popen([*train_step_args(device, quick, b, p), "--compile-only"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for b, p in TRAIN_STEP_MATRIX]


def stage_train_step(r: Runner, device: str, quick: bool, prewarm: list[subprocess.Popen]) -> None:
    for proc in prewarm:  # compile leftovers must not run beside the timings
        try:
            proc.wait(timeout=max(1.0, min(120.0, r.left())))
        except subprocess.TimeoutExpired:
            proc.kill()
    results, runs = [], []
    for batch, precision in TRAIN_STEP_MATRIX[:1] if quick else TRAIN_STEP_MATRIX:
        if r.left() < 30:
            results.append({"batch": batch, "precision": precision, "skipped": "out of time budget"})
            continue
        run = r.run(train_step_args(device, quick, batch, precision), 150)
        runs.append(run)
        results.append(last_json(run["stdout"]) or {"batch": batch, "precision": precision, "rc": run["rc"],
                                                    "timed_out": run["timed_out"]})
    replicas = None
    if r.left() >= 30:  # `train.replicas`: K replicated steps of the built-in network against K single steps
        size = ["--size", "64", "--batch", "2", "--ks", "2", "--steps", "1", "--warmup", "1"] if quick else [
            "--ks", "1", "4", "--steps", "5", "--warmup", "2"]
        run = r.run([PY, "benchmarks/replicas.py", "--device", device, "--repeats", "1", *size], 120)
        runs.append(run)
        replicas = last_json(run["stdout"])
        results.append(replicas or {"benchmark": "replicas", "rc": run["rc"], "timed_out": run["timed_out"]})
    merged = {"rc": max((x["rc"] or 1) if x["rc"] != 0 else 0 for x in runs) if runs else None,
              "seconds": round(sum(x["seconds"] for x in runs), 1), "timed_out": any(x["timed_out"] for x in runs),
              "output": "\n".join(x["output"][-1500:] for x in runs), "limit_s": 150}
    checks = {"all_ran": all("bench" in x for x in results if x.get("benchmark") != "replicas"),
              "replicas_ran": replicas is not None}
    if not quick:
        # one small model leaves a GPU idle: K=4 replicas in one step should be at least twice K single steps
        checks["replicas_k4_ge_2x_sequential"] = (replicas or {}).get("k4", {}).get("ratio", 0) >= 2.0
        bf16 = next((x for x in results if x.get("batch") == 64 and x.get("precision") == "bf16" and "bench" in x), {})
        checks["compiled_bf16_ge_1.5x_baseline"] = bf16.get("compiled_ratio", 0) >= 1.5
        checks["compiled_bf16_ge_35pct_matmul"] = bf16.get("compiled_peak_fraction", 0) >= 0.35
    r.write("train_step", all(checks.values()), merged, results, checks)


def stage_data_pipeline(r: Runner, device: str, quick: bool) -> None:
    size = ["--images", "8", "--rounds", "1", "--size", "128", "--batch", "4"] if quick else ["--images", "64",
                                                                                           "--rounds", "2"]
    run = r.run([PY, "benchmarks/data_pipeline.py", "--step", "--device", device, "--precision",
                 "fp32" if quick else "bf16", *size], 240)
    result = last_json(run["stdout"])
    checks = {"ran": result is not None}
    r.write("data_pipeline", run["rc"] == 0 and all(checks.values()), run, result, checks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no compiling (the cpu dry run)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ", ".join(STAGES))
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for all stages together")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        print(f"error: --stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {**os.environ, "CENTERPOINT_CACHE": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    r = Runner(args.out, args.budget, env)
    t0 = time.monotonic()
    steps = {"setup": lambda: stage_setup(r, args.device, args.quick),
             "tests": lambda: stage_tests(r, args.device, args.quick),
             "alignment": lambda: stage_alignment(r, args.device, args.quick),
             "nccl": lambda: stage_nccl(r, args.device, args.quick, work)}
    try:
        if "setup" in chosen:
            steps["setup"]()
        # On a GPU machine the experiment runs beside the correctness stages; the dry run (2 cores) does not.
        parallel = "experiment" in chosen and not args.quick
        experiment = start_experiment(args.device, args.quick, work, env) if parallel else None
        prewarm = start_prewarm(args.device, args.quick, env) if "train_step" in chosen else []
        concurrent = []
        for name in ("tests", "alignment", "nccl"):
            if name in chosen:
                _guarded(r, name, steps[name])
                concurrent.append(name)
        if "experiment" in chosen and experiment is None:
            experiment, concurrent = start_experiment(args.device, args.quick, work, env), []
        if experiment is not None:
            _guarded(r, "experiment", lambda: finish_experiment(r, *experiment, work, args.quick, 330, concurrent))
        if "train_step" in chosen:
            _guarded(r, "train_step", lambda: stage_train_step(r, args.device, args.quick, prewarm))
        if "data_pipeline" in chosen:
            _guarded(r, "data_pipeline", lambda: stage_data_pipeline(r, args.device, args.quick))
    finally:
        summary = {"device": args.device, "quick": args.quick, "seconds": round(time.monotonic() - t0, 1),
                   "stages": {s: ("skipped" if rec.get("skipped") else "ok" if rec.get("ok") else "FAILED")
                              for s, rec in r.records.items()},
                   "figures": _figures(r.records)}
        summary["ok"] = all(v != "FAILED" for v in summary["stages"].values()) and len(r.records) == len(chosen)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        print("GPU_CHECK_SUMMARY " + json.dumps(summary), flush=True)
    sys.exit(0 if summary["ok"] else 1)


def _guarded(r: Runner, stage: str, fn) -> None:  # noqa: ANN001
    """Run a stage; a bug in the stage itself is recorded as its failure, and the run goes on."""
    if r.left() < 5:
        r.skip(stage, "out of time budget")
        return
    try:
        fn()
    except Exception as err:  # noqa: BLE001 (whatever breaks is reported, never raised)
        r.write(stage, False, result={"error": f"{type(err).__name__}: {err}"})


def _figures(records: dict[str, dict]) -> dict:
    """The headline numbers of each stage, for the summary line."""
    f: dict[str, object] = {}
    res = {k: v.get("result") for k, v in records.items()}
    if isinstance(res.get("setup"), dict):
        f["gpu"] = res["setup"].get("gpu")
        f["matmul_bf16_tflop_s"] = res["setup"].get("matmul_bf16_tflop_s")
    if isinstance(res.get("tests"), dict):
        f["tests"] = res["tests"]
    if isinstance(res.get("alignment"), dict):
        f["fp32_loss_rel"] = res["alignment"]["fp32_one_step"]["loss_terms_rel"]["loss"]
        f["bf16_curve_max_rel"] = res["alignment"]["bf16_curve_max_rel"]
    if isinstance(res.get("experiment"), dict):
        f["experiment_mAP"] = res["experiment"].get("bbox_mAP")
        f["experiment_wall_s"] = res["experiment"].get("wall_s")
    if isinstance(res.get("train_step"), list):
        f["train_step"] = {f"b{x.get('batch')}_{x.get('precision')}": {
            k: x.get(k) for k in ("baseline_img_s", "eager_ratio", "compiled_ratio", "compiled_peak_fraction",
                                  "compile_s", "peak_mem_mb") if k in x} for x in res["train_step"]
            if x.get("benchmark") != "replicas"}
        f["replicas_ratio"] = {k: v.get("ratio") for x in res["train_step"] if x.get("benchmark") == "replicas"
                               for k, v in x.items() if isinstance(v, dict)}
    if isinstance(res.get("data_pipeline"), dict):
        d = res["data_pipeline"]
        f["data"] = {k: d.get(k) for k in ("project_img_s", "device_path_worker_img_s", "step_img_s",
                                           "workers_to_feed_step", "workers_to_feed_step_device_path")}
        # data_pipeline times the eager step; the compiled one (train_step) is what cuda runs train with
        fastest = max((x.get("compiled_img_s", 0) for x in res.get("train_step") or [] if isinstance(x, dict)),
                      default=0)
        if fastest and d.get("device_path_worker_img_s"):
            f["data"]["workers_to_feed_compiled_step_device_path"] = round(fastest / d["device_path_worker_img_s"], 2)
            f["data"]["workers_to_feed_compiled_step_workers_path"] = round(fastest / d["project_img_s"], 2)
    return f


if __name__ == "__main__":
    main()
