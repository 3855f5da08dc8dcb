"""Loss curves from `--log-jsonl` files: text, visual and total loss side by side, one line per run.

    python -m engine.plot runs/a/log.jsonl runs/b/log.jsonl --output curves.png [--smooth 20] [--labels A B] \
        [--log-y]

Skipped (non-finite) steps are left out; validation losses, when logged, are drawn as markers on the text panel.
`--log-y` draws the losses on a logarithmic axis (a loss that falls by orders of magnitude stays readable after the
first steps).
Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (("lm_loss", "text loss (cross-entropy)"), ("visual_loss", "visual loss (1 - cosine)"),
          ("loss", "total loss"))


def read_log(path: str | Path) -> list[dict]:
    """Records of one run; a line cut by a crash is ignored, and a resumed run's repeated iterations keep the
    last occurrence."""
    by_iteration: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "iteration" in record:
            by_iteration[int(record["iteration"])] = record
    return [by_iteration[k] for k in sorted(by_iteration)]


def moving_average(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_runs(paths: list[str], labels: list[str] | None = None, smooth: int = 1, log_y: bool = False):
    """The matplotlib figure (three panels: text, visual, total loss; one line per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(p).parent.name + "/" + Path(p).name if len(paths) > 1 else Path(p).name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} --labels for {len(paths)} logs")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for path, label in zip(paths, labels):
        records = read_log(path)
        if not records:
            raise ValueError(f"{path}: no records")
        for ax, (key, _) in zip(axes, PANELS):
            points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None and not r.get("skipped")]
            if log_y:  # a log axis cannot show zero or negative values
                points = [(x, y) for x, y in points if y > 0]
            if points:
                xs, ys = zip(*points)
                (line,) = ax.plot(xs, moving_average(list(ys), smooth), label=label, linewidth=1.2)
                if key == "lm_loss":
                    valid = [(r["iteration"], r["valid_lm_loss"]) for r in records
                             if r.get("valid_lm_loss") is not None and (not log_y or r["valid_lm_loss"] > 0)]
                    if valid:
                        vx, vy = zip(*valid)
                        ax.plot(vx, vy, "o", color=line.get_color(), markersize=4, label=f"{label} (valid)")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title + (" (log scale)" if log_y else ""))
        ax.set_xlabel("iteration")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both" if log_y else "major")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(paths: list[str], output: str, labels: list[str] | None = None, smooth: int = 1,
              log_y: bool = False) -> Path:
    """Draws the runs and writes the figure to `output` (png, pdf, svg)."""
    import matplotlib.pyplot as plt

    fig = draw_runs(paths, labels, smooth, log_y)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="--log-jsonl files, one per run")
    parser.add_argument("--output", required=True, metavar="FILE", help="image file (png, pdf, svg)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one per log (default: the file names)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="moving-average window in steps (default: %(default)s, no smoothing)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis (default: linear)")
    from engine.cli_help import show_defaults

    args = show_defaults(parser).parse_args(argv)
    try:
        out = plot_runs(args.logs, args.output, args.labels, args.smooth, log_y=args.log_y)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ImportError:
        print("error: engine.plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    print(f"wrote {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
