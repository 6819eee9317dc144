"""Metrics tables, summaries, plots and console output."""
