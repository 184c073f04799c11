"""faults tests."""
