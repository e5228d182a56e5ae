"""Slurm: `unipers slurm submit|status|collect` (slurm.py renders and queues, report.py follows and gathers)."""
