"""Label Studio ML backend: pre-labels a project's tasks and learns from its annotations, over gRPC."""
