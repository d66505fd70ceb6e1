"""The gRPC gateway: a transport-free core (catalog, predictor) behind thin grpc.aio servicers."""
