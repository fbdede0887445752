from tasks import lmeval, wikitext2  # noqa: F401  (importing registers the tasks)
