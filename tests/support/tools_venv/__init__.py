"""Scripts run by tests in the tools venv (.venv-tools), never imported by pytest itself."""
