"""End-to-end bench: real processes on loopback, direct vs tunnel vs nginx proxy (issue 4)."""
