"""The desired and observed files on disk: the one place that reads and writes them."""
