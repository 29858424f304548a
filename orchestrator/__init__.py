"""Sweep orchestrator: grid expansion, validation, submission (submitit), results database."""
