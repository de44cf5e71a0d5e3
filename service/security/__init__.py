"""Who may call lstm-serve: TLS / mTLS for both ports, bearer tokens, the caller (principal)."""
