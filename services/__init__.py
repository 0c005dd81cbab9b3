"""services: model worker, coordinator, gateway, metrics and gRPC servicers.

Imports eft_core, torch, transformers and grpc; never ray (that is cluster/'s job).
"""
