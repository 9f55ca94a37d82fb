"""Token ids -> the text a client receives: incremental decoding and stop strings."""

from __future__ import annotations


class TextStream:
    """The text of a growing output, released only where it can no longer change.

    Held back: a trailing replacement character (half of a multi-byte character) and a tail that
    could still become a stop string. A stop string ends the text before it (OpenAI's ``stop``).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = ""  # text released so far
        self._text = ""  # the whole output's text at the last push

    def push(self, output_ids: list[int]) -> tuple[str, bool]:
        """The newly released text, and whether a stop string ended the output."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        self._text = text
        if self.stop:
            # Only text past what was released can hold a new match (the released text held none).
            start = max(0, len(self.sent) - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                return self._release(text[:min(hits)]), True
        stable = text.rstrip("\ufffd")
        hold = max((n for s in self.stop for n in range(1, len(s)) if stable.endswith(s[:n])), default=0)
        return self._release(stable[:len(stable) - hold]), False

    def flush(self) -> str:
        """At the end of the output (not at a stop string): whatever was held back."""
        return self._release(self._text)

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed released text (rare): release nothing now
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
