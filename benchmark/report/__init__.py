"""Reporting: statistics (intervals, paired tests), claims, per-example export, templates."""
