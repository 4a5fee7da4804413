"""Measuring where memory goes in a real step: allocator-exact totals, attributed by category and module."""
