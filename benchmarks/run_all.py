"""Run every benchmark script in turn and collect their tables into one Markdown file.

Order: inference, memory, few labels, training (which reads the few-label curves for its
plateau time), then ``bench_lazy.py`` when present. Each script runs in its own process with
the same mode (``--smoke``/``--quick``/``--full``, passed only to scripts that accept it),
``--device`` and ``--threads``; JSON goes to ``--results-dir`` and the printed tables are
gathered in ``<results-dir>/latest.md``.

``--threads`` defaults to 1: on a 2-core machine shared with other jobs, two OpenMP threads
lose whole scheduler slices at every barrier (the threading probes of bench_inference and
bench_training measure it). Pass ``--threads 0`` for torch's default on a quiet machine.

    python benchmarks/run_all.py [--quick | --smoke | --full] [--device cuda] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SCRIPTS = ("bench_inference", "bench_memory", "bench_fewlabels", "bench_training", "bench_lazy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny runs (seconds each)")
    mode.add_argument("--quick", action="store_true", help="a few minutes in all")
    mode.add_argument("--full", action="store_true", help="large sizes and budgets (long)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: torch default")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=None,
                   help="run only these scripts")
    p.add_argument("--skip", nargs="+", choices=SCRIPTS, default=[])
    return p.parse_args(argv)


def _help(script: Path) -> str:
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=300)
    return res.stdout


def command(name: str, args: argparse.Namespace) -> list[str] | None:
    """The command line for one script, with only the flags its --help lists."""
    script = BENCH_DIR / f"{name}.py"
    if not script.is_file():
        return None
    accepted = _help(script)
    cmd = [sys.executable, str(script)]
    for flag in ("smoke", "quick", "full"):
        if getattr(args, flag) and f"--{flag}" in accepted:
            cmd.append(f"--{flag}")
    options = {"--device": args.device, "--threads": str(args.threads),
               "--out": str(args.results_dir / f"{name}.json")}
    if name == "bench_training":
        options["--fewlabels-json"] = str(args.results_dir / "bench_fewlabels.json")
    for flag, value in options.items():
        if flag in accepted:
            cmd += [flag, value]
    return cmd


def run(cmd: list[str]) -> tuple[int, str]:
    """Run streaming its output; returns (exit code, output)."""
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return proc.returncode, "".join(lines)


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """All tables of this run, one section per script."""
    parts = ["# Benchmark results", ""]
    machine = None
    for r in results:
        data = r.get("data") or {}
        machine = machine or data.get("machine")
        parts += [f"## {r['name']} ({r['status']}, {r['wall_s']:.0f} s wall)", ""]
        if data.get("noise"):
            parts += [f"Other processes' load during the run: {data['noise']}", ""]
        for title, text in (data.get("tables") or {}).items():
            parts += [f"{title}:", "", "```", text, "```", ""]
    if machine:
        parts += ["## Machine", "", "```", json.dumps(machine, indent=2), "```", ""]
    parts += [f"Command: `{' '.join(sys.argv)}`", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only or SCRIPTS) if n not in args.skip]
    results = []
    t0 = time.perf_counter()
    for name in names:
        cmd = command(name, args)
        if cmd is None:
            print(f"== {name}: not present, skipped", flush=True)
            continue
        print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc, _ = run(cmd)
        wall = time.perf_counter() - t
        out = args.results_dir / f"{name}.json"
        data = json.loads(out.read_text()) if rc == 0 and out.is_file() else None
        results.append({"name": name, "rc": rc, "wall_s": wall, "data": data,
                        "status": "ok" if rc == 0 else f"FAILED rc={rc}"})
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.0f} s",
              flush=True)
    # Scripts not run this time keep their last results in the Markdown, marked as such.
    ran = {r["name"] for r in results}
    for name in SCRIPTS:
        out = args.results_dir / f"{name}.json"
        if name not in ran and out.is_file():
            data = json.loads(out.read_text())
            results.append({"name": name, "rc": 0, "wall_s": data.get("wall_s") or 0.0,
                            "data": data, "status": "from an earlier run", "earlier": True})
    results.sort(key=lambda r: SCRIPTS.index(r["name"]))
    md = args.results_dir / "latest.md"
    md.write_text(markdown(results, args))
    summary = {"argv": sys.argv, "wall_s": time.perf_counter() - t0,
               "scripts": [{k: r[k] for k in ("name", "rc", "wall_s", "status")}
                           for r in results if not r.get("earlier")]}
    (args.results_dir / "run_all.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nall done in {summary['wall_s']:.0f} s; tables in {md}", flush=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
