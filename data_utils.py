"""Tokenize the data files of a task into training records (python data_utils.py --config FILE).

Reuses the records when nothing that shapes them changed (data, tokenizer, template, lengths, strategy),
and says why when it rebuilds. Without --config, config/default.yaml is used.
"""

import sys

from glmtune.config import ConfigError, build_parser, parse_args
from glmtune.data.readers import DataError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument(
        "--force", type=bool, default=False, help="Rebuild even if the records are up to date."
    )
    cfg, ns = parse_args(parser, argv)
    from glmtune.data.prepare import prepare_records

    try:
        prepared = prepare_records(cfg, force=ns.force)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    r = prepared.report
    print(f"records: {r.train_records} train, {r.eval_records} eval in {r.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
