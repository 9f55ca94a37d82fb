"""``s2d serve``: an OpenAI-compatible server for several targets and one draft.

scheduler.py (slots, the stepping thread), text.py (incremental text, stop strings), protocol.py
(the OpenAI wire format), app.py (FastAPI routes, metrics), cli.py (the command). Import
``s2d.serve.app`` for ``Server`` and ``create_app``; this package imports nothing heavy itself.
"""
