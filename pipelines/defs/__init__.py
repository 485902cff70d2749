"""Domain folders, each exposing `definitions() -> dagster.Definitions`."""
