"""A command-line client for people: classify and explain images against a running server."""
