"""The end-to-end search: optimisers on Optuna, the level space and its database, scoring, the study, storage."""
