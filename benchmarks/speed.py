#!/usr/bin/env python3
"""FastFace speed benchmark: a thin entry to ``fastface bench`` (the logic is in fastface.bench).

    python benchmarks/speed.py --backbone tiny --repeats 3 --json out.json
    python benchmarks/speed.py --backbone fullsize --resolution 1024 --device cuda --dtype bf16

See ``--help`` and benchmarks/RESULTS.md.
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastface.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
