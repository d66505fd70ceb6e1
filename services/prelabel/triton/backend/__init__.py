"""The generic python-backend model that Triton runs for every Prelabel model version."""
