"""The ``prelabel`` command line."""

import os

# Every child the command line starts is a fresh interpreter or Triton's binary, exec'd right after
# fork (prelabel.processes): nothing forked goes on using gRPC. gRPC's fork handlers would only
# print "Other threads are currently calling into gRPC, skipping fork() handlers" whenever a child
# starts while calls are in flight. Set before anything imports grpc; an operator's choice wins.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
