"""Generic byte-level text classification from CSV files (AG News, Yelp, ...) -> processed data.

Each row is ``label,text[,more text...]``: the first column is the label, the remaining columns are joined
with a space (AG News: title and description). A first row whose label is a column name (label, class, target,
sentiment, rating, stars, y) is a header and skipped. Labels: the sorted distinct training label values
(numerically when all are integers, e.g. AG News' 1..4) map to 0..C-1; the mapping is stored in the meta as
"label_map" and a test label unseen in training is an error. Texts become byte + 1 ids (0 = padding)
truncated to ``max_len`` bytes; empty texts are skipped and counted. Dev is every 10th training row
(index % 10 == 9), train the rest. Each file is read twice (labels and count, then fill).

    python -m preprocess.create_csv_text --train train.csv --test test.csv --out OUT [--name NAME]
        [--max_len 4000] [--force]
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
