"""IMDB reviews (aclImdb) -> processed lra-text data, byte-level.

Reads ``RAW/aclImdb/{train,test}/{neg,pos}/*.txt`` (labels neg=0, pos=1). Ids are byte + 1 (0 = padding),
truncated to ``max_len`` bytes (default 4000). Order: neg files then pos files, each sorted by name. The dev
split is every 10th training review in that order (index % 10 == 9: exactly 10% of each class when the
class sizes are multiples of 10), train is the rest, test is ``aclImdb/test``. Empty reviews are skipped and
counted (meta "skipped_empty").

    python -m preprocess.create_text --raw RAW --out OUT [--max_len 4000] [--force]
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.text import preprocess_text

__all__ = ["preprocess_text", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("IMDB (aclImdb) -> processed lra-text .npz, byte-level.", 4000)
    a = p.parse_args(argv)
    report(preprocess_text(a.raw, a.out, a.max_len, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
