"""Pure decisions: which processes are whose, what to do about them, and what to report."""
