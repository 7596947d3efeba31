"""Plain data: the catalog, the desired and observed state files, and the facts a pass gathers."""
