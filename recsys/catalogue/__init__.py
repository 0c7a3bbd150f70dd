"""The live catalogue: items added between retrains (issue #18)."""
