"""Generated gRPC stubs (build output of proto/generate.py, never edited or committed).

Hand-written code imports stubs from here only, e.g. ``from services.pb.eft.v1 import worker_pb2``.
"""
