"""ListOps release TSVs -> processed lra-listops data (a command line over sat.data.listops).

Reads ``RAW/listops-1000/basic_{train,val,test}.tsv`` (val becomes dev) and keeps LRA's token stream:
parentheses removed, ``]`` kept, ids from the fixed vocabulary (0 = padding), padded to ``max_len``. A
sequence longer than ``max_len`` is an error, not truncated. See docs/data.md.

    python -m preprocess.create_listops --raw RAW --out OUT [--max_len 2000] [--force]
"""

from __future__ import annotations

from sat.data.listops import preprocess_listops
from sat.data.prepare import base_parser, report, run_cli

__all__ = ["preprocess_listops", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("ListOps TSVs -> processed lra-listops .npz (LRA's tokens, no truncation).", 2000)
    a = p.parse_args(argv)
    report(preprocess_listops(a.raw, a.out, a.max_len, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
