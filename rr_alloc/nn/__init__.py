"""Network mechanics: prunable layers, hooks, masks and N:M patterns, channel statistics, output metrics."""
