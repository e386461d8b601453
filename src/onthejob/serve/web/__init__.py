"""The review page: a person signs in with a tenant key, reads sessions, reviews them, and
sees and steers what the model learned (runs, adapter versions, the gate's numbers).
Server-rendered Jinja templates on the server's FastAPI app; works without JavaScript.
Imports onthejob.serve.http/schemas, onthejob.store, onthejob.model.adapters and
onthejob.learn.activation (the one checked activation, shared with the CLI)."""

from onthejob.serve.web.pages import add_review_pages

__all__ = ["add_review_pages"]
