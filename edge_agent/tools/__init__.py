"""Offline tools, never on the agent's hot path: evaluate, bench, demo, the dataset layout and
accuracy metrics (AUROC, PRO)."""
