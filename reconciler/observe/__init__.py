"""Read-only looks at the machine: processes, ports, probes, GPU, engine output, file events."""
