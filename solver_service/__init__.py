"""Standalone solver for QPM's binary quadratic selection/assignment problem (library, CLI and HTTP service)."""
