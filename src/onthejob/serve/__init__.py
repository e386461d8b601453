"""Serving: the OpenAI-compatible HTTP server, the terminal chat, and the generation engine
they share. Imports onthejob.config, onthejob.model and onthejob.store."""
