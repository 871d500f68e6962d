"""Edges: each module here is one side effect (filesystem, inotify, HTTP, D-Bus, journal)."""
