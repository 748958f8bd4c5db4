"""Tokenize the data files of a task into training records (python data_utils.py --config FILE).

Reuses the records when nothing that shapes them changed (data, tokenizer, template rendering, lengths,
strategy), and says why when it rebuilds. Without --config, config/default.yaml is used. `--inspect N` then
prints the first N training samples as a token / id / label table: the tokens whose label is not -100 are the
ones the loss is computed on.
"""

import sys

from glmtune.config import ConfigError, build_parser, parse_args
from glmtune.data.readers import DataError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--force", type=bool, default=False, help="Rebuild even if the records are up to date."
    )
    parser.add_argument(
        "--inspect",
        type=int,
        default=0,
        help="Print the first N training samples as a token / id / label table (label -100: no loss).",
    )
    cfg, ns = parse_args(parser, argv)
    from glmtune.data.prepare import prepare_records
    from glmtune.data.supervision_table import supervision_tables

    if ns.inspect < 0:
        print(f"error: --inspect: a number of samples >= 0, not {ns.inspect}", file=sys.stderr)
        return 1
    try:
        prepared = prepare_records(cfg, force=ns.force)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    r = prepared.report
    print(f"records: {r.train_records} train, {r.eval_records} eval in {r.out_dir}")
    if ns.inspect:
        for line in supervision_tables(prepared.train_path, prepared.tokenizer, ns.inspect):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
