"""The composition root: settings, CLI, the FastAPI app, authentication, routing to shards, HTTP errors."""
