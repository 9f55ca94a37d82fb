"""``s2d serve``: an OpenAI-compatible server for several targets and one draft.

scheduler.py (slots, the stepping thread), text.py (incremental text, stop strings), protocol.py
(the OpenAI wire format), app.py (FastAPI routes, metrics), cli.py (the command). Import
``s2d.serve.app`` for ``Server`` and ``create_app``; this package imports nothing heavy itself.
"""

# Prompt tokens prefilled per scheduler step of a target (``s2d serve --prefill-chunk``): the other sequences'
# decode steps run between the chunks of a long prompt. Here, not in scheduler.py, so the command's --help
# imports nothing heavy. The same as s2d.decode.PREFILL_CHUNK (a test checks): a prompt is cut where
# generate and batches cut it, so the server's outputs are theirs.
DEFAULT_PREFILL_CHUNK = 256
