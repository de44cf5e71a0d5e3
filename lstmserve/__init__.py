"""Generated gRPC stubs (tools/codegen.py)."""
