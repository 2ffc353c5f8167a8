"""IMDB reviews (aclImdb) -> processed lra-text data, byte-level.

A command line over sat.data.prepare.text, whose docstring says what is read and written:

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
