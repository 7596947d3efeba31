"""The only code that starts, signals or stops processes, with the records and cgroups saying whose."""
