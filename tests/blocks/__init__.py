"""Test-only blocks: what a researcher writes to add a block (one class, one YAML, one registration)."""
