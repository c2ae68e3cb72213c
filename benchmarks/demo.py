"""`make demo`'s main job on a first run (empty engine and model cache): ours and the baseline code.

Runs the command of the Makefile's ``demo`` target,

    python -m fiftyone_nola auto-label --images <DIR> --classes airplane,...,truck --dataset <name>
        --gt-from-subfolders ground_truth [--descriptions <DIR>/descriptions.json]
        --fallback-random-init --max-samples 1000

(<DIR> as printed by ``scripts/demo_data.py``), once with the code of ``--baseline-rev`` (default
``5212106``, the commit before the engine's pay-back rule; extracted with git archive) and once
with this working tree, the baseline first, each as its own subprocess with its code directory as
cwd and ``PYTHONPATH``, a fresh empty ``NOLA_HOME`` (no converted engine, no engine choice, no
stored embeddings or weights) and its own dataset name, in a private FiftyOne database dropped at
the end. ``--isa`` sets ``NOLA_CPU_ISA`` for both sides (e.g. ``avx512_vnni``: a CPU with VNNI
and no bf16).

From each run's output: the per-stage seconds ([embed:clip], [embed:dino], [zeroshot], [dino],
prompt tuning, [predict], engine conversions, the auto engine decision), the 'done in' seconds,
the subprocess's wall time and its ``[engine]`` lines. JSON keys: ``demo_s`` / ``baseline_demo_s``,
``demo_wall_s`` / ``baseline_demo_wall_s``, ``stages`` / ``baseline_stages``,
``engine_conversion_s`` / ``engine_lines`` (per side), ``cpu_isa`` (honouring ``NOLA_CPU_ISA``),
``cpu_isa_detected``, ``cpu_model``, ``loadavg_before`` / ``loadavg_after``, ``target_demo_s``.

    .venv/bin/python benchmarks/demo.py --json benchmarks/results/demo.json --txt benchmarks/results/demo.txt
    .venv/bin/python benchmarks/demo.py --isa avx512_vnni --json benchmarks/results/demo_vnni.json \
        --txt benchmarks/results/demo_vnni.txt
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, baseline_code, loadavg, run_benchmark, table  # noqa: E402

BASELINE_REV = "5212106"  # the commit before the engine's pay-back rule (eff71ea)
CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"
TARGET_DEMO_S = 180
DATASET = "nola-demo-bench"

# Stage name -> pattern of the line that reports its seconds (group 1).
STAGE_PATTERNS = {
    "embed_clip": re.compile(r"^\[embed:clip\] embedded .*? in ([\d.]+)s"),
    "embed_dino": re.compile(r"^\[embed:dino\] embedded .*? in ([\d.]+)s"),
    "zeroshot": re.compile(r"^\[zeroshot\] \d+ samples -> .*? in ([\d.]+)s"),
    "dino": re.compile(r"^\[dino\] k=.* in ([\d.]+)s"),
    "prompt_tuning": re.compile(r"^prompt tuning done in ([\d.]+)s"),
    "predict": re.compile(r"^\[predict\] \d+ samples -> .*? in ([\d.]+)s"),
    "engine_conversion": re.compile(r"^\[engine\] converted .*? in ([\d.]+)s"),
    "engine_decision": re.compile(r"^\[engine\] auto chose .*; decided in ([\d.]+)s"),
}
DONE = re.compile(r"^done in ([\d.]+)s")
ROWS = (
    "embed_clip",
    "embed_dino",
    "zeroshot",
    "dino",
    "prompt_tuning",
    "predict",
    "engine_conversion",
    "engine_decision",
)


def parse_output(text: str) -> dict:
    """Stage seconds (summed where a stage reports more than once), counts, 'done in', engine lines."""
    stages: dict[str, float] = {}
    counts: dict[str, int] = {}
    done = None
    engine_lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[engine]"):
            engine_lines.append(line)
        for name, pat in STAGE_PATTERNS.items():
            m = pat.search(line)
            if m:
                stages[name] = stages.get(name, 0.0) + float(m.group(1))
                counts[name] = counts.get(name, 0) + 1
        m = DONE.search(line)
        if m:
            done = float(m.group(1))
    return {"stages": stages, "counts": counts, "done_s": done, "engine_lines": engine_lines}


def demo_images() -> Path:
    p = subprocess.run([sys.executable, "scripts/demo_data.py"], cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"scripts/demo_data.py: exit {p.returncode}: {p.stdout.strip()} {p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def run_side(label: str, code: Path, images: Path, tmp: Path, args) -> dict:
    """One first-run demo with ``code``'s package, a fresh NOLA_HOME; its seconds and lines."""
    home = Path(tempfile.mkdtemp(prefix=f"home-{label}-", dir=tmp))
    env = {**os.environ, "PYTHONPATH": str(code), "NOLA_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("NOLA_RANDOM_INIT", None)
    if args.isa:
        env["NOLA_CPU_ISA"] = args.isa
    # Which package `python -m fiftyone_nola` imports from this cwd / PYTHONPATH (must be `code`'s).
    pkg = subprocess.run(
        [sys.executable, "-c", "import fiftyone_nola; print(fiftyone_nola.__file__)"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not pkg.startswith(str(code)):
        raise RuntimeError(f"{label}: fiftyone_nola imported from {pkg}, not from {code}")
    dataset = f"{DATASET}-{label}"
    cmd = [sys.executable, "-m", "fiftyone_nola", "auto-label", "--images", str(images), "--classes", CLASSES]
    cmd += ["--dataset", dataset, "--gt-from-subfolders", "ground_truth"]
    if (images / "descriptions.json").is_file():
        cmd += ["--descriptions", str(images / "descriptions.json")]
    cmd += ["--fallback-random-init", "--max-samples", str(args.max_samples)]
    print(f"\n--- {label}: {code} (NOLA_HOME {home}) ---", flush=True)
    load0 = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - t0
    load1 = loadavg()
    parsed = parse_output(p.stdout)
    for line in p.stdout.splitlines():
        if line.startswith(
            ("[embed:", "[zeroshot]", "[dino] k=", "prompt tuning done", "[predict]", "[engine]", "done in")
        ):
            print("  " + line, flush=True)
    # [engine] lines sent as warnings (stderr) too, in case a side logs them there.
    parsed["engine_lines"] += [ln.strip() for ln in p.stderr.splitlines() if "[engine]" in ln]
    print(f"  exit {p.returncode}, wall {wall:.1f} s, load {load0:.2f} -> {load1:.2f}", flush=True)
    out = {
        "code": str(code),
        "package_file": pkg,
        "dataset": dataset,
        "command": cmd,
        "returncode": p.returncode,
        "wall_s": wall,
        "loadavg_before": load0,
        "loadavg_after": load1,
        "stdout_tail": p.stdout.splitlines()[-40:],
        "stderr_tail": p.stderr.splitlines()[-20:],
        **parsed,
    }
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", flush=True)
    return out


def delete_datasets(names) -> None:
    import fiftyone as fo

    for name in names:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def run(args, results: dict, tables: list, tmp: Path) -> None:
    if args.isa:
        os.environ["NOLA_CPU_ISA"] = args.isa
    sys.path.insert(0, str(REPO))
    from fiftyone_nola.core import cpu_isa as ci

    results["cpu_isa"] = ci.cpu_isa()
    results["cpu_isa_detected"] = ci._detected()[0]
    results["cpu_model"] = results.get("machine", {}).get("cpu_model") or ci.cpu_name()
    results["nola_cpu_isa_env"] = args.isa
    results["baseline_rev"] = args.baseline_rev
    results["head"] = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results["working_tree_changes"] = subprocess.run(
        ["git", "-C", str(REPO), "status", "--short", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.splitlines()
    results["target_demo_s"] = TARGET_DEMO_S
    results["order"] = "baseline first, then ours (one run each)"
    images = demo_images()
    results["images"] = str(images)
    results["loadavg_before"] = loadavg()
    sides = []
    if args.baseline_rev != "none":
        sides.append(("baseline", baseline_code(args.baseline_rev, tmp)))
    sides.append(("ours", REPO))
    runs: dict[str, dict] = {}
    try:
        for label, code in sides:
            runs[label] = r = run_side(label, code, images, tmp, args)
            prefix = "" if label == "ours" else "baseline_"
            results[f"{prefix}demo_s"] = r["done_s"]
            results[f"{prefix}demo_wall_s"] = r["wall_s"]
            results[f"{prefix}stages"] = r["stages"]
            results[f"{prefix}run"] = r
            if r["returncode"] != 0:
                raise RuntimeError(f"{label}: exit {r['returncode']}: {r['stderr_tail'][-3:]}")
    finally:
        results["loadavg_after"] = loadavg()
        results["engine_conversion_s"] = {k: r["stages"].get("engine_conversion", 0.0) for k, r in runs.items()}
        results["engine_lines"] = {k: r["engine_lines"] for k, r in runs.items()}
        delete_datasets(r["dataset"] for r in runs.values())

    base, ours = runs.get("baseline", {}), runs.get("ours", {})

    def row(name, b, o):
        return [name, b, o, (o - b) if b is not None and o is not None else None]

    rows = [row(s, base.get("stages", {}).get(s), ours.get("stages", {}).get(s)) for s in ROWS]
    rows.append(row("done in (demo_s)", base.get("done_s"), ours.get("done_s")))
    rows.append(row("subprocess wall", base.get("wall_s"), ours.get("wall_s")))
    title = (
        f"make demo, first run, {args.max_samples} images; cpu_isa {results['cpu_isa']} "
        f"(detected {results['cpu_isa_detected']}, {results['cpu_model']}); baseline {args.baseline_rev}, "
        f"ours {results['head']}; target {TARGET_DEMO_S} s"
    )
    tables.append(table(["stage (s)", "baseline", "ours", "ours - base"], rows, title))
    eng = []
    for label in ("baseline", "ours"):
        for line in runs.get(label, {}).get("engine_lines", []):
            eng.append(f"  {label:<8} {line}")
    tables.append("[engine] lines:\n" + ("\n".join(eng) if eng else "  (none)"))
    tables.append(
        f"load average: before {results['loadavg_before']:.2f}, after {results['loadavg_after']:.2f}; "
        + "; ".join(f"{k} {r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f}" for k, r in runs.items())
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline, or 'none'")
    p.add_argument("--isa", default="", help="NOLA_CPU_ISA for both sides (e.g. avx512_vnni); default: detected")
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--txt", metavar="PATH")
    args = p.parse_args(argv)
    return run_benchmark("demo", args, run, "nola-bench-demo")


if __name__ == "__main__":
    sys.exit(main())
