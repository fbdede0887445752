"""MoQAE (ACL 2025): the method (``moqae.method``), its routers, training and report section."""
