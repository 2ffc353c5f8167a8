"""AAN document pairs -> processed lra-retrieval data, byte-level, two inputs per example.

A command line over sat.data.prepare.retrieval, whose docstring says what is read and written:

    python -m preprocess.create_retrieval --raw RAW --out OUT [--max_len 4000] [--force]
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.retrieval import preprocess_retrieval

__all__ = ["preprocess_retrieval", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("AAN pairs (tsv_data) -> processed lra-retrieval .npz, byte-level, two inputs.", 4000)
    a = p.parse_args(argv)
    report(preprocess_retrieval(a.raw, a.out, a.max_len, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
