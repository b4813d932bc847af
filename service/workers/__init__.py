"""`--workers N`: a supervisor starts N server processes sharing the ports, restarts them, and
merges their statistics and metrics."""
