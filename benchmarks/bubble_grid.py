"""The whole grid of issue #10 §2: vocab-1 and vocab-2's simulated 1F1B bubble against plain 1F1B's
(p-1)/(m+p-1) + 1 point, for p = 2, 3, 4, 6, 8, 12, 16, 24, 32, m = p, p+1, 2p, 4p, 8p and
V = 4k, 16k, 64k, 256k (180 points x 2 methods). tests/unit/test_schedule_bubble.py checks a sample
of it in the default suite; this runs every point (minutes on 2 cores). Simulated, not timed.

    .venv/bin/python benchmarks/bubble_grid.py [p,p,...]

Prints every point over the bound and the worst margin; exits 1 if any point is over.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "unit"))

from test_schedule_bubble import GRID_PS, GRID_VOCABS, _bound, grid_bubble, grid_ms  # noqa: E402


def main(argv: list[str]) -> int:
    ps = [int(x) for x in argv[0].split(",")] if argv else list(GRID_PS)
    over, worst = 0, -1.0
    for p in ps:
        for m in grid_ms(p):
            for vocab in GRID_VOCABS:
                for method in ("vocab-1", "vocab-2"):
                    bubble = grid_bubble(method, p, m, vocab)
                    margin = bubble - _bound(p, m)
                    worst = max(worst, margin)
                    if margin > 0:
                        over += 1
                        print(f"OVER {method} p={p} m={m} V={vocab}: {bubble:.2%} > {_bound(p, m):.2%}", flush=True)
        print(f"p={p} done; worst margin so far {worst:+.2%}", flush=True)
    print(f"{over} points over the bound; worst bubble - bound = {worst:+.2%}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
