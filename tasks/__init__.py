from tasks import lmeval, longbench, wikitext2  # noqa: F401  (importing registers the tasks)
