"""Run options: each declared once (``options``), the ``RunConfig`` they make up, and YAML config files."""
