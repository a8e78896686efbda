"""Summarise a py-spy raw profile (``py-spy record --threads -f raw``): where each thread's samples went.

Run:  python scripts/spy_summary.py FILE.raw [--seconds S --rate R] [--top N]

Prints each thread's share of the samples, then per thread the innermost frames (self time) and the
frames anywhere on the stack (inclusive time). With ``--gil`` recordings only the thread holding the
GIL is sampled, so samples / (seconds x rate) is how busy the GIL was, and the per-thread shares say
who held it: give ``--seconds`` and ``--rate`` (py-spy's -d and -r) to have that printed.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path


def read(path: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, count) per distinct stack; the first frame names the thread."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int) -> list[str]:
    total = sum(n for _, n in stacks)
    threads: Counter[str] = Counter()
    own: dict[str, Counter[str]] = defaultdict(Counter)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    for frames, n in stacks:
        thread = frames[0]
        threads[thread] += n
        if len(frames) > 1:
            own[thread][frames[-1]] += n
        for frame in set(frames[1:]):  # a recursive frame counts once per sample
            inclusive[thread][frame] += n
    lines = [f"{total} samples"]
    for thread, n in threads.most_common():
        lines.append(f"{n:7d} {100 * n / total:5.1f}%  {thread}")
    for thread, n in threads.most_common(4):
        lines += ["", f"{thread}: self"]
        lines += [f"{c:7d} {100 * c / n:5.1f}%  {frame}" for frame, c in own[thread].most_common(top)]
        lines += [f"{thread}: inclusive (frames on every sample left out)"]
        shared = [(frame, c) for frame, c in inclusive[thread].most_common() if c < n]
        lines += [f"{c:7d} {100 * c / n:5.1f}%  {frame}" for frame, c in shared[:top]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--seconds", type=float, help="py-spy's -d: with --rate, prints how busy the GIL was")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's -r [100]")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stacks = read(args.file)
    lines = summarise(stacks, args.top)
    if args.seconds:
        expected = args.seconds * args.rate
        held = sum(n for _, n in stacks) / expected
        lines.insert(1, f"GIL held in {held:.0%} of {expected:.0f} sampling ticks")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
