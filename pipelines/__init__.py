"""Orchestration: the Dagster definitions and the `gpuledger` command line."""
