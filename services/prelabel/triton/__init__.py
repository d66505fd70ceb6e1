"""Everything about NVIDIA Triton: the model repository, the embedded server, the client adapter."""
