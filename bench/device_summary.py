"""python -m bench.device_summary WORK_DIR SUMMARY_MD

The summary of one run of bench/device_check.sh, from the files it left in WORK_DIR: the environment,
each step's status and time, the test counts and failures, the tuning table's gains, the triton/cuda
dispatch choice, and per op and shape the forward+backward time of every implementation with its
speedup over the reference and fastlm's ratio to the fastest peer.
"""

import json
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def _read(path):
    return path.read_text(errors="replace").strip() if path.exists() else None


def steps_section(work):
    lines = ["## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
    text = _read(work / "steps.tsv") or ""
    for line in text.splitlines()[1:]:
        name, status, seconds = line.split("\t")
        lines.append(f"| {name} | {status} | {seconds} |")
    return lines


def test_counts(work):
    """(counts, failed test ids) from the JUnit XML, else from pytest -v lines of the log."""
    xml = work / "pytest.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
            failed = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None
            ]
            return counts, failed
        except (ET.ParseError, AttributeError):
            pass
    log = _read(work / "tests.log") or ""
    outcomes = re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b\s+(\S+)", log)
    counts = defaultdict(int)
    for outcome, _ in outcomes:
        counts[outcome.lower()] += 1
    failed = [test for outcome, test in outcomes if outcome in ("FAILED", "ERROR")]
    return {"from log (incomplete run)": len(outcomes), **counts}, failed


def tests_section(work):
    counts, failed = test_counts(work)
    lines = ["## Tests", "", ", ".join(f"{key}: {value}" for key, value in counts.items())]
    if failed:
        lines += ["", f"Failed ({len(failed)}):", ""] + [f"- `{test}`" for test in failed[:40]]
        if len(failed) > 40:
            lines.append(f"- … and {len(failed) - 40} more (tests.log)")
    return lines


def tuning_section(work):
    text = _read(work / "tuning.json")
    if text is None:
        return ["## Tuning", "", "no tuning table was written"]
    measured = json.loads(text).get("measured", {})
    lines = [
        "## Tuning (Triton launch configurations)",
        "",
        "| family | shape class | shape | default ms | best ms | gain | chosen | refused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, result in sorted(measured.items()):
        family, shape_class = key.split("/")
        refused = sum("error" in c for c in result["candidates"])
        chosen = result["best"] or "default"
        lines.append(
            f"| {family} | {shape_class} | {result['shape']} | {result['default_ms']:.4f} | {result['best_ms']:.4f} "
            f"| {result['default_ms'] / result['best_ms']:.2f}× | {chosen} | {refused}/{len(result['candidates'])} |"
        )
    return lines


def benchmark_section(path):
    """One table per benchmark file: rows are (shape, dtype), columns implementations, cells fwd+bwd ms and
    speedup over the reference; a last column: the fastest fastlm backend over the fastest other peer."""
    data = json.loads(path.read_text())
    ceilings = data.get("ceilings") or {}
    rows = [r for r in data["rows"] if r["mode"] == "fwd+bwd"]
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["median_ms"] is not None))
    groups = list(dict.fromkeys((r["op"], r["shape"], r["dtype"]) for r in rows))
    title = f"## {path.stem}: forward+backward, ms (speedup over the reference)"
    lines = [title, ""]
    if ceilings:
        lines += [
            f"Ceilings measured in the run: copy {ceilings['copy_gbps']:.0f} GB/s, "
            f"matmul {ceilings['matmul_tflops']:.0f} TFLOP/s ({ceilings['matmul_dtype']}).",
            "",
        ]
    lines += ["| op | shape | dtype | " + " | ".join(impls) + " | fastlm / best peer |"]
    lines += ["| --- " * (len(impls) + 4) + "|"]
    notes = []
    for group in groups:
        cells, ours, peers = [], [], []
        for impl in impls:
            match = [r for r in rows if (r["op"], r["shape"], r["dtype"]) == group and r["impl"] == impl]
            timed = [r for r in match if r["median_ms"] is not None]
            if not timed:
                cells.append("–")
                notes += [f"{group[0]} {group[1]}: {impl}: {r['note']}" for r in match if r["note"]]
                continue
            r = timed[0]
            cells.append(f"{r['median_ms']:.3f} ({r['speedup']:.2f}×)")
            (ours if impl.startswith("fastlm") else peers).append(r["median_ms"])
        ratio = f"{min(peers) / min(ours):.2f}×" if ours and peers else "–"
        lines.append(f"| {group[0]} | {group[1]} | {group[2]} | " + " | ".join(cells) + f" | {ratio} |")
    absent = sorted({r["impl"] + ": " + r["note"] for r in rows if r["median_ms"] is None and r["note"]})
    if absent or notes:
        lines += ["", "Not timed: " + "; ".join(absent or notes)]
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m bench.device_summary WORK_DIR SUMMARY_MD")
    work, target = Path(argv[0]), Path(argv[1])
    lines = ["# fastlm device check", "", "## Environment", "", "```", _read(work / "environment.txt") or "?", "```"]
    info = _read(work / "info.txt")
    if info:
        lines += ["", "```", info, "```"]
    lines += [""] + steps_section(work) + [""] + tests_section(work) + [""] + tuning_section(work)
    dispatch = _read(work / "dispatch.json")
    lines += ["", "## Dispatch for CUDA tensors (fastest of triton / cuda, fwd+bwd)", "", f"`{dispatch or '{}'}`"]
    for path in sorted(work.glob("*.json")):
        if path.name in ("tuning.json", "dispatch.json"):
            continue
        try:
            lines += [""] + benchmark_section(path)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            lines += ["", f"## {path.name}", "", f"could not be summarised: {err}"]
    target.write_text("\n".join(lines) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
