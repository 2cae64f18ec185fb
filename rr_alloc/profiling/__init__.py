"""Per-layer evidence: the RR profile, output sensitivities, and the content-addressed store they are kept in."""
