"""``python -m atst_features ...`` is ``atst-embed ...``."""

from .cli.embed import embed

if __name__ == "__main__":
    embed(prog_name="atst-embed")
