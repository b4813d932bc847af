"""Who may call and how the ports are exposed: bearer tokens, TLS files, exposure warnings."""
