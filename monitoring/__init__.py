"""Drift statistics and the controller's metrics (the drift-monitoring issue builds them here)."""
