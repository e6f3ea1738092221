"""Runs every `bench_*.py` in its own process, one per framework.

python -m benchmarks [--smoke]
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    failures = 0
    for script in sorted(glob.glob(os.path.join(here, "bench_*.py"))):
        name = os.path.basename(script)
        print(f"\n## {name}\n", flush=True)
        result = subprocess.run([sys.executable, script, *sys.argv[1:]], check=False)
        if result.returncode:
            print(f"{name} failed with exit code {result.returncode}", flush=True)
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
