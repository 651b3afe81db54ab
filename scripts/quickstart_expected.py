"""Write recipes/quickstart.expected.json from a finished quickstart run, and print the README's table.

    kiln run recipes/quickstart.yaml                         # fresh, timed: `time kiln run ...`
    python scripts/quickstart_expected.py runs/quickstart --quickstart-minutes 11 --test-minutes 7

tests/test_docs.py fails when the README's quickstart table or its stated minutes differ from this
file, so the README's figures cannot drift from what a fresh run prints."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from lmkiln.eval.results import table_rows

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished quickstart run directory")
    parser.add_argument("--quickstart-minutes", type=float, required=True, help="wall time of the fresh run")
    parser.add_argument("--test-minutes", type=float, required=True, help="wall time of .ci/run on a fresh clone")
    args = parser.parse_args()
    results = json.loads((args.run_dir / "eval" / "eval.json").read_text())
    header, rows = table_rows(results)
    table = {row[0]: dict(zip(header[1:], row[1:])) for row in rows}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    expected = {
        "measured_at_commit": commit,
        "quickstart_minutes": args.quickstart_minutes,
        "test_minutes": args.test_minutes,
        "table": table,
    }
    (ROOT / "recipes" / "quickstart.expected.json").write_text(
        json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
    )
    print(json.dumps(expected, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
