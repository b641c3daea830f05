"""Workflow tests (`fusion test`): cases in YAML beside a workflow, run with mocked steps
and compared against expectations that may hold matchers (docs/testing.md)."""
