"""Generic byte-level text classification from CSV files (AG News, Yelp, ...) -> processed data.

A command line over sat.data.prepare.csv_text, whose docstring says what is read and written:

    python -m preprocess.create_csv_text --train train.csv --test test.csv --out OUT [--name NAME]
    python main_train.py --task csv-text --data_dir OUT
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.csv_text import preprocess_csv_text

__all__ = ["preprocess_csv_text", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("CSV label,text files -> processed byte-level text classification .npz.", 4000, raw=False)
    p.add_argument("--train", required=True, help="training CSV (label,text)")
    p.add_argument("--test", required=True, help="test CSV (label,text)")
    p.add_argument("--name", default="csv", help="the data set's name, kept in the meta (e.g. agnews)")
    a = p.parse_args(argv)
    report(preprocess_csv_text(a.train, a.test, a.out, a.name, a.max_len, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
