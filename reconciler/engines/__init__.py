"""Engines and their models, knowing nothing of the reconciler: stand-ins, llama.cpp, model makers."""
