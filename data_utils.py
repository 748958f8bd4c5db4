"""Tokenize the data files of a task into training records (python data_utils.py --config FILE; also
`glmtune data`). `--inspect N` prints the first N training samples as a token / id / label table."""

import sys

from glmtune.command import data_main as main

if __name__ == "__main__":
    sys.exit(main())
