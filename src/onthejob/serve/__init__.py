"""Serving: the OpenAI-compatible HTTP server, the review page (serve/web), the terminal chat,
and the generation engine they share. Imports onthejob.config, onthejob.model and
onthejob.store; dreams and the review page's checked adapter activation come from
onthejob.dream and onthejob.learn."""
