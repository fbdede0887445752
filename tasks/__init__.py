from tasks import wikitext2  # noqa: F401  (registers wikitext2)
