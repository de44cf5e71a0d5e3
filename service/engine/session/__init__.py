"""Sessions: a Session owns its transitions; the SessionStore indexes them; quotas per principal."""
