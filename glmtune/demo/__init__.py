"""The embedded default: the demo's config (default.yaml), its data (data/) and the tiny model built from it.

These files ship inside the package, so an installed glmtune runs its default from any folder. The checkout's
config/default.yaml, data/train.json and data/dev.json are copies of them for the scripts' users.
"""
