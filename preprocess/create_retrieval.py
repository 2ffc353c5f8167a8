"""AAN document pairs -> processed lra-retrieval data, byte-level, two inputs per example.

Reads ``RAW/tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (eval becomes dev): tab-separated
``label id1 id2 text1 text2`` with no header (a first line whose label is not a number is taken for a header
and skipped). Labels are 0/1 (written as ``0``/``1`` or ``0.0``/``1.0``). Each text becomes byte + 1 ids
(0 = padding) truncated to ``max_len`` bytes; x is (n, 2, max_len), lengths (n, 2). Pairs with an empty text
are skipped and counted (meta "skipped_empty"). The file is read twice (count, then fill): bounded memory
apart from the output arrays.

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
