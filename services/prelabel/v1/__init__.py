"""Generated gRPC code for protos/prelabel/v1 (scripts/generate_protos.py); do not edit."""
