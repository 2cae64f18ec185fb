"""Plans out: the plan document and its schema, building one from a session, replaying, exporting, reporting."""
