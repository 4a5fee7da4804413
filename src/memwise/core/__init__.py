"""Core types of memwise: Workload, Recipe, sizes, errors. Imports nothing else of memwise."""
