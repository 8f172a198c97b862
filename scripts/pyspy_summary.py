"""Where the samples of a py-spy raw profile go, within the stacks that pass through a function.

    python3 scripts/pyspy_summary.py frames.txt [--within DuplexEngine.step] [--top 25]

`bash scripts/bench_gpu.sh pyspy` records live frames with py-spy (`--format raw --threads
--native --idle`): one line a distinct stack, "frame;frame;... count", outermost first. This
keeps the stacks of each thread that contain `--within` (a substring of a frame, e.g. the live
step or the encode worker's loop), then counts, for every sample, its innermost Python frame and
its innermost frame of all (native included): what the thread was running, and in which line of
ours. Not a unit test: an aid for reading one profile.
"""

from __future__ import annotations

import argparse
import collections
import re


def parse(path: str) -> list[tuple[list[str], int]]:
    """(frames outermost first, samples) for each line of a raw profile."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            out.append((stack.split(";"), int(count)))
    return out


def is_python(frame: str) -> bool:
    """A Python frame reads 'function (file.py:line)'; a native one names a library or none."""
    return re.search(r"\.py:\d+\)$", frame) is not None


def summarize(stacks, within: str, top: int) -> list[str]:
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for frames, n in stacks:
        m = re.match(r"thread \((\d+)\)", frames[0])  # "thread (id)" or "thread (id): name"
        thread = f"thread {m.group(1)}" if m else "?"
        if not any(within in f for f in frames):
            continue
        totals[thread] += n
        py = [f for f in frames if is_python(f)]
        by_thread[thread][py[-1] if py else "(no Python frame)"] += n
        leaves[thread][frames[-1]] += n
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"== {thread}: {total} samples within {within!r}")
        lines.append("  innermost Python frame:")
        for frame, n in by_thread[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {frame}")
        lines.append("  innermost frame (native included):")
        for frame, n in leaves[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--within", default="DuplexEngine.step",
                    help="keep the stacks with a frame containing this (default: the live step)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print("\n".join(summarize(parse(args.profile), args.within, args.top)))


if __name__ == "__main__":
    main()
