"""The light lstm-serve package: the exporter/service contract, the Python client and
`lstm-client`, and the generated gRPC stubs. Needs protobuf, grpcio and numpy only: importing
it never loads onnxruntime, redis or prometheus_client (tests/e2e/test_light_package.py)."""
