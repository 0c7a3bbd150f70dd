"""Generated gRPC code for the ``recsys.v1`` API (from ``protos/recsys/v1/recommender.proto``).

Do not edit the ``recommender_pb2*`` modules by hand: change the ``.proto`` and run ``python -m recsys.protogen``
(``make proto``). ``tests/test_proto.py`` fails when they drift apart.
"""
