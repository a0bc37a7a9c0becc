"""Leaf schemas shared by every layer (plain Python; imports no project package)."""
