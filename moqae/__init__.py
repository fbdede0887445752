from moqae import method  # noqa: F401  (registers moqae)
