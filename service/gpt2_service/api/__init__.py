"""The gRPC API layer: the only part of the service that knows protobuf.

convert (proto <-> engine types), status (error table, rich status), gate (admission while
loading/draining), servicer (TextGeneration), server (gRPC server, health, reflection), logs
(request ids in log lines).
"""
