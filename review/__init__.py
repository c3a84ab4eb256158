"""The review web app: radiologists decide on held results, administrators read reports.

Server-rendered pages (Starlette + Jinja2, served by uvicorn); users, decisions and audit rows live in the
ledger. :func:`review.app.create_app` builds the application from a :class:`review.config.ReviewConfig`
and the actions the composition root (``specgate``) injects (enqueue a delivery, retract a result), so
this package never imports the worker or the settings.
"""
