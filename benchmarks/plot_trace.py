"""Draw an engine trace (Chrome trace JSON from `LLM(trace_path=...)` or `serve --trace-dir`) as a PNG timeline.

    python3 benchmarks/plot_trace.py trace.json            # -> benchmarks/results/trace.png
    python3 benchmarks/plot_trace.py trace.json --out t.png --max-lanes 12

One row per lane (the engine steps first, then each request in order of appearance); slices ("X" events)
are bars coloured by name (vit, prefill, decode, forward, ...), instants ("i") are ticks. For exploring, open
the same file in ui.perfetto.dev; this picture is for reports and the README.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from results_dir import default_output, prepare_output

COLOURS = {"step": "#d9d9d9", "schedule": "#9e9e9e", "vit": "#e45756", "forward": "#4c78a8",
           "sample": "#72b7b2", "update": "#bab0ac", "preprocess": "#f58518", "preprocess queue": "#ffbf79",
           "resolve": "#ffbf79", "queued": "#eeeeee", "prefill": "#54a24b", "decode": "#b279a2"}


def lanes(events: list[dict]) -> tuple[list[int], dict[int, str]]:
    """Lane ids in drawing order (the engine lane, then requests by first event) and their names."""
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    order = []
    for event in sorted((e for e in events if e.get("ph") in ("X", "i")), key=lambda e: e["ts"]):
        if event["tid"] not in order:
            order.append(event["tid"])
    order.sort(key=lambda tid: tid != 0)  # the engine's steps on top (stable: requests keep their order)
    return order, names


def plot(events: list[dict], out: Path, max_lanes: int = 16) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order, names = lanes(events)
    order = order[:max_lanes]
    row = {tid: index for index, tid in enumerate(order)}
    timed = [e for e in events if e.get("ph") in ("X", "i") and e["tid"] in row]
    start = min((e["ts"] for e in timed), default=0.0)
    figure, axis = plt.subplots(figsize=(12, 0.45 * len(order) + 1.2))
    seen = set()
    for event in timed:
        y, x = row[event["tid"]], (event["ts"] - start) / 1000.0  # ms
        if event["ph"] == "X":
            if event["name"] == "step":
                continue  # the step's parts are drawn; the whole step would hide them
            colour = COLOURS.get(event["name"], "#888888")
            label = event["name"] if event["name"] not in seen else None
            seen.add(event["name"])
            axis.barh(y, max(event.get("dur", 0) / 1000.0, 0.05), left=x, height=0.6, color=colour, label=label)
        else:
            axis.plot([x, x], [y - 0.35, y + 0.35], color="black", linewidth=0.8)
    axis.set_yticks(range(len(order)), [names.get(tid, str(tid)) for tid in order])
    axis.invert_yaxis()
    axis.set_xlabel("time since the first event (ms)")
    axis.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")  # beside the lanes, hiding none
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a trace JSON file ({'traceEvents': [...]})")
    parser.add_argument("--out", default=None, help="PNG path (default: benchmarks/results/<trace name>.png)")
    parser.add_argument("--max-lanes", type=int, default=16, help="lanes drawn, engine first (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        events = json.loads(args.trace.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"plot_trace: error: {args.trace}: not a readable trace ({err})", file=sys.stderr)
        return 1
    out = prepare_output(args.out or default_output(args.trace.stem + ".png"))
    print(f"wrote {plot(events, out, args.max_lanes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
