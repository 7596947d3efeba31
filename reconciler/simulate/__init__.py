"""The seed's three failure simulations, runnable on any machine: zombies, patience, empty request."""
