"""A third-party llmd driver for "another OpenAI-compatible server", and that server."""
