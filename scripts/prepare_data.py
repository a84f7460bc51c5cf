"""Download the paper's training set and benchmarks and write them as local parquet files for offline clusters.

    python scripts/prepare_data.py --out-dir data                        # all presets, from the hub
    python scripts/prepare_data.py --out-dir data aime math500           # some of them
    python scripts/prepare_data.py --out-dir data aime --source-file aime_raw.jsonl   # a local file of the hub schema

Each output data/<preset>.parquet has the columns id, problem, answer, source (answers normalised as the
preset describes: last \\boxed{} of MATH solutions, AMC floats as integers, OlympiadBench context + first
answer). Use it with ``data.val.<name>: {path: data/<preset>.parquet, id_field: id}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thinktwice_pl.data import PRESETS, ProblemSource, load_problems, resolve_source, write_parquet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", metavar="PRESET", help=f"default: all of {', '.join(PRESETS)}")
    parser.add_argument("--out-dir", type=Path, required=True, help="where <preset>.parquet files go")
    parser.add_argument("--source-file", help="read this local .jsonl/.json/.parquet (hub schema) instead of the hub")
    args = parser.parse_args(argv)
    names = args.presets or list(PRESETS)
    if args.source_file and len(names) != 1:
        parser.error("--source-file needs exactly one preset")
    for name in names:
        source = resolve_source(ProblemSource(preset=name), path=args.source_file)
        problems = load_problems(source, flag_prefix=f"preset {name}")
        out = write_parquet(problems, args.out_dir / f"{name}.parquet")
        print(f"{name}: {len(problems)} problems from {source.path} -> {out}")


if __name__ == "__main__":
    main()
